"""BlockPull: flatten running QEMU VM disks (QMP block-stream) from a CLI or a Kubernetes resource.

Modules:
- `errors`: the one exception tree (transient vs permanent, each with a condition reason).
- `qmp`: one QMP connection with timeouts and bounded event fan-out.
- `chain`: reading the block graph safely; resolving disks and bases.
- `stream`: starting, following, steering and finishing a block-stream job.
- `quantity`: bandwidth parsing.
- `cli`: the `blockpull` command.
- `agent`: the Kubernetes node agent (kopf).
"""

__version__ = "0.1.0"
