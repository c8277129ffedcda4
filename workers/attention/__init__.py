"""Attention backends over the paged KV pool: neutral per-step metadata, one file per backend."""
