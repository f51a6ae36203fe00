"""The directory ``loopwatch run`` puts on ``PYTHONPATH`` (see ``sitecustomize``)."""
