"""From a model name to a runnable GGUF file in the store; each module is one step of that road.

``manifest`` (what a model is), ``store`` (where its files live), ``sources`` (where a file can come
from), ``pull`` (files into the store), ``mirror`` / ``verify`` / ``imports`` (other ways in and
out), ``estimates`` (sizes and shapes), ``runnable`` (is the runnable file there and intact),
``plan`` (what running it takes on this machine), ``prepare`` (fetch -> convert -> quantize).
"""
