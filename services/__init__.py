"""Loopline's services, one folder each (installed as ``loopline.services``)."""
