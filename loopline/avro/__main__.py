"""``python -m loopline.avro SCHEMA [--fields a,b] [--spec FILE]``: print generated Avro code.

SCHEMA is a schema kind (prediction, feedback, deadletter, alert, registry) or, with ``--spec``,
``features``/``raw`` of that pipeline spec. Prints the compiled reader, the compiled writer where
the schema has one (dead letters) and, for features/raw, the generated features encoder: what
runs on the hot paths, readable for debugging.
"""

from __future__ import annotations

import argparse

from loopline.avro import codecs as codec_module
from loopline.avro.codecs import Codec
from loopline.avro.readers import Unsupported
from loopline.avro.writers import features_encoder_source, writer_source


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments and print the generated sources."""
    parser = argparse.ArgumentParser(prog="python -m loopline.avro",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("schema", choices=codec_module.KINDS)
    parser.add_argument("--fields",
                        help="comma-separated top-level fields the reader keeps (default: all)")
    parser.add_argument("--spec", help="pipeline spec YAML (needed for features and raw)")
    args = parser.parse_args(argv)
    if args.schema in ("features", "raw"):
        if not args.spec:
            parser.error(f"{args.schema} depends on a pipeline spec: pass --spec FILE.yaml")
        from loopline.spec import load_spec  # only this branch needs specs

        spec = load_spec(args.spec)
        schema = spec.features_schema() if args.schema == "features" else spec.raw_schema()
        codec = Codec(schema)
    else:
        codec = codec_module.codec(args.schema)
        schema = codec.schema
    fields = args.fields.split(",") if args.fields else None
    print(f"# compiled reader of {codec.name} (fingerprint {codec.fingerprint.hex()})")
    print(codec.reader_source(fields))
    if args.schema in ("features", "raw"):
        print(f"# generated features encoder of {codec.name}")
        print(features_encoder_source(schema))
    elif args.schema == "deadletter":  # the one fixed schema written through a compiled writer
        named = codec_module.named_types()
        expanded = codec_module.parse_record(schema, named, expand=True)
        try:
            source = writer_source(expanded)
        except Unsupported as e:
            source = f"# fastavro writes it: {e}"
        print(f"# compiled writer of {codec.name}")
        print(source)


if __name__ == "__main__":
    main()
