"""Mutation tests of the safety rules (SAFETY.md): a recorded list of mutations and their runner."""
