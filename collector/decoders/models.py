"""Which EcoFlow model a serial number or productType names (used for units that differ by model)."""

from __future__ import annotations

import functools

# Serial-number prefixes seen in captures and EcoFlow's documentation.
SN_PREFIXES = (
    ("MR51", "Delta Pro 3"),
    ("R351", "Delta 2 Max"),
    ("R331", "Delta 2"),
    ("R601", "River 2"),
    ("R611", "River 2 Max"),
    ("R621", "River 2 Pro"),
    ("R631", "River 3"),
    ("HW51", "PowerStream"),
    ("HW52", "Smart Plug"),
    ("DAEB", "Delta Max"),
    ("DAAB", "Delta Max"),
    ("DCAB", "Delta Pro"),
    ("DCEB", "Delta Pro"),
    # Delta Pro Ultra: Y711 serials in public integrations' examples and tests.
    ("Y711", "Delta Pro Ultra"),
)

# App `latestQuotas` replies name the model by number.
PRODUCT_TYPES = {
    12: "River Pro",  # foxthefox/ioBroker.ecoflow-mqtt test/data2/riverpro.json
    13: "Delta Max",
    14: "Delta Pro",
    15: "Delta Mini",  # tolwi/hassio-ecoflow-cloud diag/delta_mini.json latestQuotas replies
    72: "River 2 Pro",
    80: "Delta 2",
    81: "Delta 2 Max",
}


def model_for(sn: str | None, product_type: object = None) -> str | None:
    """The model name, from productType first (it is explicit), then the serial prefix."""
    if isinstance(product_type, int) and product_type in PRODUCT_TYPES:
        return PRODUCT_TYPES[product_type]
    return _model_for_sn(sn) if sn else None


def unknown_product_type(product_type: object) -> int | None:
    """`product_type` when a payload names one we do not map (so we cannot know what its keys
    mean on that model), else None."""
    if type(product_type) is int and product_type not in PRODUCT_TYPES:
        return product_type
    return None


@functools.lru_cache(maxsize=4096)
def _model_for_sn(sn: str) -> str | None:
    upper = sn.upper()
    for prefix, model in SN_PREFIXES:
        if upper.startswith(prefix):
            return model
    return None
