"""`python -m loopline.brokers`: check Java, fetch the kafka engine's jars ahead (`make kafka`)."""

from __future__ import annotations

import sys

from loopline.brokers.maven import classpath, java_binary, kafka_version
from loopline.errors import BrokerError


def main() -> int:
    """Fetch the pinned Apache Kafka into the user cache (once) and say where it is."""
    try:
        java = java_binary()
        lib = classpath(lambda line: print(line, flush=True))
    except BrokerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"kafka engine: Apache Kafka {kafka_version()}, {len(list(lib.glob('*.jar')))} jars in "
          f"{lib}; Java: {java}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
