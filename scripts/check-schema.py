#!/usr/bin/env python3
"""Validate TOML config files against meshgate's JSON Schema.

    scripts/check-schema.py SCHEMA FILE...

Each file is read as TOML (tomllib) and checked with a JSON Schema validator
(python3-jsonschema, draft 2020-12). Prints each problem with the file and
the key path; exits 1 if any file does not conform.
"""
import json
import sys
import tomllib

import jsonschema


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    with open(sys.argv[1], encoding="utf-8") as f:
        schema = json.load(f)
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    bad = 0
    for path in sys.argv[2:]:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        for e in errors:
            where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
            print(f"{path}: {where}: {e.message}")
        if errors:
            bad += 1
        else:
            print(f"{path}: ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
