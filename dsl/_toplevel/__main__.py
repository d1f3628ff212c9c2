"""``python -m weightflow`` runs the same CLI as the ``weightflow`` console script."""

from weightflow.dsl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
