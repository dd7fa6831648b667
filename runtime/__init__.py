"""effc's BSR runtime: the packed format (``format``), CPU kernels (``cpu``) and the torch
module that runs them in place of ``nn.Linear`` (``modules``)."""
