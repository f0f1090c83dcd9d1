"""Kubernetes plumbing shared by the gateway's discovery and the controllers.

* ``client``: ``KubeClient``, raw-JSON calls of the official client addressed by ``Resource``; ``ApiError``.
* ``informer``: ``Informer``, the list/watch cache of one resource, handing every change to the event loop.
* ``objects``: what every reader of raw objects agrees on: keys, label selectors, pod readiness, owner
  references, API times.

What only the controllers need (work queue, reconcile loop, conditions, events, manager) is in
``controllers.runtime``.
"""
