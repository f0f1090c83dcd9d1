"""A small controller-runtime on asyncio: what the controllers share beyond watching the cluster.

The shape is controller-runtime's, cut down to what the controllers here use:

* ``workqueue``: ``WorkQueue``, de-duplicating, never one key on two workers, delayed adds, per-key
  exponential backoff.
* ``controller``: ``Controller``, informer changes to keys, ``reconcile(key) -> Result`` on worker tasks,
  a level-triggered resync.
* ``conditions``: status conditions, and status writes that answer a 409 themselves.
* ``events``: ``EventRecorder``, ``core/v1`` Events about an object.
* ``manager``: ``Manager``, shared informers and the start order.

The API client, the informer and the object helpers are ``brickyard_core.kube``'s, shared with the
gateway's discovery.
"""
