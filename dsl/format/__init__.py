"""Bytes on disk: the dtype table, safetensors reading, writing and digests, and the sparse
(bitmask + values) delta format with its one reader, and how numbers and report tables are
written as text.
"""
