"""Measurement: neural velocity on a fixed aux set (torch only; imports no decision rule).

* ``monitor`` - :class:`~neve_tune.VelocityMonitor`, the public face: baseline, ``measure()``, state;
* ``selection``, ``layertable`` - which modules are hooked, which output they read, on which dim neurons lie;
* ``inputs`` - the aux set as batches on the model's device, and the forward call;
* ``hooks`` - the forward hooks and the passes that run the aux set under them;
* ``snapshot`` - the previous responses, one flat buffer per (device, dtype);
* ``accumulate``, ``kernel``, ``compare.c`` - the per-neuron sums (compiled CPU kernel or PyTorch ops);
* ``bnfuse`` - eval BatchNorms measured from the pass of the module that feeds them;
* ``subsample`` - the opt-in bounded-memory mode (a fixed sample of positions per neuron);
* ``coverage`` - the share of parameters in measured modules;
* ``layer`` - the per-module record every mechanism writes its own fields of;
* ``saving`` - the monitor's ``state_dict()`` and ``load_state_dict()``;
* ``state`` - the saved state: format, fingerprints, compact snapshot encodings.
"""
