"""Several models working as one: a router over specialists and a small-to-large cascade.

Speculative decoding, the third hybrid, lives beside the decode loop in ``engine/speculative.py``.
"""
