"""Write the key reference tables of docs/configuration.md from cnntrain/schema.py.

    python scripts/config_docs.py          # rewrite the tables between <!-- keys:begin/end -->
    python scripts/config_docs.py --check  # exit 1 when they differ from the schema's

tests/test_docs.py runs the check; after changing a key's declaration or a default in configs/,
run this script and commit docs/configuration.md."""

import argparse
import sys

from cnntrain.config_docs import DOC, update


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = parser.parse_args()
    same = update(DOC, check=args.check)
    if args.check and not same:
        print(f"{DOC} is out of date: run python scripts/config_docs.py", file=sys.stderr)
        return 1
    print(f"{DOC}: {'up to date' if same else 'tables rewritten'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
