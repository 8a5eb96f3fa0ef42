"""Protobuf schemas for EcoFlow gen-3 payloads and their generated code (scripts/gen-proto)."""
