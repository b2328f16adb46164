"""Avro for every Loopline topic: schemas, codecs (single-object encoding), compiled
readers/writers.

- :mod:`loopline.avro.codecs`: the schemas in ``schemas/``, fingerprints and :class:`Codec`
  (fastavro encodes and resolves older writers);
- :mod:`loopline.avro.readers`: readers generated as Python source per schema and field set;
- :mod:`loopline.avro.writers`: the feature-event encoder generated per features schema.

``python -m loopline.avro SCHEMA`` prints the generated code of a schema, for debugging.
"""

from loopline.avro.codecs import (
    HEADER_LEN,
    KINDS,
    MAGIC,
    Codec,
    codec,
    fingerprint,
    is_backward_compatible,
    load_schema,
    named_types,
    schema_text,
    with_features,
)

__all__ = ["HEADER_LEN", "KINDS", "MAGIC", "Codec", "codec", "fingerprint",
           "is_backward_compatible", "load_schema", "named_types", "schema_text", "with_features"]
