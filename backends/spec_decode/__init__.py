"""Speculative decoding in the native engine: drafters propose tokens, the target model verifies them in
the same forward pass as the other requests' decode tokens (see docs/architecture.md)."""
