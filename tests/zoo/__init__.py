"""Tiny real decoders with entmax attention in many code styles (the matcher's fixtures)."""
