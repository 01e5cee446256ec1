"""Your model, your data and your training loop: the one seam user code enters through.

Design note (for the engineers who build on it: federated LoRA, federated RL).

**The object.** :class:`~fedforge.workload.base.Workload` is a frozen dataclass of plain
callables: ``model()`` builds the ``nn.Module`` (callers seed torch around it), ``data(site)``
returns one site's data for a :class:`~fedforge.workload.base.Site` (``path``: the site's
file or directory, ``index``: its client id in simulation, -1 when a deployed site reads its
data before it connects), ``train(model, loader, config)`` optionally replaces the built-in
local SGD, ``test()`` gives the server's central test set. ``sites`` says what a simulation
federates; ``metrics`` the names ``train`` may report beside ``train_loss``; ``proximal`` that
``train`` adds ``config.proximal(model)``; ``schema`` the settings that give the data its
meaning (compared in the handshake); ``federation`` builds a simulation's sites at once (the
built-in datasets: one pooled array and index arrays).

**How it is loaded.** ``configured.configured_workload(config, shape)`` turns a
``RunConfig`` into a workload: ``workload = "module:NAME"`` names an object; otherwise
``model.factory``, ``data.loader`` (or ``data.sites`` read by :mod:`.readers`) and
``client.train`` are assembled, and the built-in datasets and models are workloads too
(:mod:`.builtin`). Import paths resolve against ``project_dir`` (the configuration's
directory) then installed modules (:mod:`.imports`). ``fedforge run`` and ``simulate`` pool
the sites (:func:`.federate.federate`) into a ``FederatedDataset``; ``fedforge server`` builds
the model and the test set; ``fedforge client CONFIG --data PATH`` builds its own workload from
its own configuration and reads and checks its data before connecting (``net/site.py``) --
a client never imports code the server's configuration names. Server and client compare
:func:`.fingerprint.fingerprint` of the model and the schema in the handshake.

**How a custom client program plugs in.** ``Workload.train`` becomes a
``train.user_loop.UserLoop`` in the ``ClientApp``: it runs where the built-in program's steps
would, on the module holding the global model, and the algorithm's ``finish`` turns the
trained weights into the record, so every stage, aggregation kind and runtime but the
vectorized one run it. An algorithm that needs the program's internals says why in its
``loop_refusal`` class attribute and is refused at load (``user_loop.loop_problem``).

**For LoRA.** ``fedforge.llm.workload`` is the LoRA workload (``[lora]``): ``model()``
returns the frozen base with adapters; a parameter with ``requires_grad = False`` is never
exchanged (``train/torch_model.py``) and the fingerprint carries the SHA-256 of the frozen
weights. Token ids are integer ``x`` arrays. A Hugging Face ``Trainer`` is a ``train``
(``fedforge.llm.hf_trainer``).

**Opaque sites (RL).** ``Workload(opaque=True)``: ``data(site)`` returns any object (an RL
agent's environment); ``ClientData.of_object`` holds it beside one placeholder row (the site's
weight, and its evaluation slot) and ``FederatedDataset.of_objects`` pools a simulation's, so
every runtime, the driver and the stages run unchanged; ``train(model, site_data, config)``
gets the object, ``evaluate(model, site_data)`` (any workload) replaces loss and accuracy,
``train_cohort`` trains a round's sites at once on the vectorized runtime
(``runtime/site_cohort.py``). ``fedforge.rl.workload`` is the RL workload on it.
"""

from fedforge.workload.base import Site, TrainConfig, TrainFunction, Workload
from fedforge.workload.readers import read_data

__all__ = ["Site", "TrainConfig", "TrainFunction", "Workload", "read_data"]
