"""The BlockPull node agent: a kopf operator that runs the pulls of its own node.

- `settings`: configuration from the environment, the socket template.
- `spec`: a BlockPull's spec as typed values.
- `status`: the status and conditions, computed purely.
- `kube`: the few Kubernetes API calls (status, events, delete).
- `reporter`: one object's throttled status writes.
- `vms`: one shared QMP connection per VM.
- `runner`: one object's lifecycle against QEMU.
- `manager`: all objects of the node: runners, TTL, deletion.
- `metrics`: the Prometheus metrics of the node's jobs.
- `handlers`: the thin kopf layer.
"""
