"""Integer arithmetic shared by the loader's shard positions and the model's packed layouts.

It lives in data/ because data/ sits at the bottom of the layering (data -> moe -> train -> launch):
moe/experts.py imports it from here, and data/ may import nothing from moe/.
"""


def ceil_div(a: int, b: int) -> int:
    """a / b rounded up, for b > 0 (``ceil_div(a, 8) * 8``: a rounded up to a multiple of 8)."""
    return -(-a // b)
