"""Views for people: reports (Markdown, HTML), tensor statistics for ``show``.

Views read the lock file and the store; they never fingerprint inputs or touch a network.
"""
