"""The pinned Apache Kafka release of the `kafka` engine: pom.xml and the broker's log4j2 config.

Installed as ``loopline.infra_kafka`` so the engine finds these files in a wheel as well.
"""
