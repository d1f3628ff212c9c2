"""Shared torch-side code of the ops (imported lazily by the ops that need it)."""
