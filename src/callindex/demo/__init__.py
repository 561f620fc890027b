"""``callindex demo``: many worker processes, two client types per state, a flaky
API, retries, and an audit trail that comes out complete and collision-free,
next to what in-process counters would have done.

* :mod:`.verdict`: the checks, pure functions of rows and outcomes;
* :mod:`.events`: the work items and the events workers send;
* :mod:`.workers`: the worker processes (callindex's and the legacy replay's);
* :mod:`.legacy`: the old in-process counters and their table;
* :mod:`.runner`: the orchestration; :mod:`.render`: what is printed;
* :mod:`.interrupts`: Ctrl-C, handled by the parent alone.
"""

from callindex.demo.runner import DEFAULT_FAULTS, DemoConfig, run_demo
from callindex.demo.verdict import Gap, Outcome, TrailRow, Verdict

__all__ = ["DEFAULT_FAULTS", "DemoConfig", "Gap", "Outcome", "TrailRow", "Verdict", "run_demo"]
