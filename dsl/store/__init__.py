"""The store: content-addressed objects and action entries (``content``), the lock file
beside each pipeline, verification, garbage collection and export to user directories.
"""
