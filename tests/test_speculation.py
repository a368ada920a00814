"""The supervisor's judgement of running strips (`speculation.judge`), as a pure function: which
strips are hung or crawling, where copies go, which processes are stopped, when a job fails.

The same rules run against real workers in tests/test_gray.py; here each branch is pinned down
with made-up measurements, including the ones a two-worker cluster cannot show.
"""

from __future__ import annotations

from luminagrid import costs, ops
from luminagrid.codec import Codec
from luminagrid.liveness import Hold, Node
from luminagrid.messages import JobSpec
from luminagrid.record import RUNNING, Record
from luminagrid.speculation import Facts, judge

JOB = "5f3a87b2-0000-4000-8000-000000000000"
STALL_S = 3.0


def record(strips: int = 4) -> Record:
    op = ops.get("denoise")
    spec = JobSpec.create(op, op.values({}), id=JOB, width=1000, height=800, channels=1, strips=strips,
                          codec=Codec.lossless, quality=95)
    return Record(spec=spec, output=None, submitted_at=0.0, state=RUNNING)


def node(name: str, *holds: Hold, slots: int = 1, plugin: bool = True) -> Node:
    origin = str(ops.origin("denoise")) if plugin else "luminagrid 0.0.1"
    return Node(id=f"{name}@h[1{len(name)}]", hostname=f"{name}@h", pid=10 + len(name), seq=5, alive=True, age_s=0.1,
                holds=holds, slots=slots, ops={"denoise": origin})


def run(index: int, pid: int = 100, run_s: float = 2.0, cpu_s: float = 2.0, idle_s: float = 0.0) -> Hold:
    return Hold(f"{JOB}.strip{index}", f"tag{index}-{pid}", "running", pid, run_s, cpu_s, idle_s)


def facts(nodes: list[Node], finished: set[int] = frozenset(), cost: float | None = 1.0, **extra: object) -> Facts:
    r = record()
    known = {costs.class_of(r.spec): costs.Cost(cost, cost * 1.2, 8)} if cost is not None else {}
    base = {"nodes": nodes, "jobs": {JOB: r}, "finished": {JOB: set(finished)}, "done": {JOB: len(finished)},
            "costs": known, "hung_on": {},
            "copied": {}, "winners": {}, "pending": {}}
    return Facts(**(base | extra))  # type: ignore[arg-type]


def test_a_strip_without_cpu_progress_for_the_stall_time_is_copied_to_another_node_at_once() -> None:
    a = node("a", run(0, idle_s=STALL_S + 0.1))
    b = node("b", run(1))  # busy: a hung strip does not wait for a free pool process
    plan = judge(facts([a, b], finished={2, 3}), STALL_S)
    assert [(x.index, x.target.id, x.reason) for x in plan.launches] == [(0, b.id, "hung")]
    assert "used no CPU for 3.1 s" in plan.launches[0].why
    assert plan.hangs == {(JOB, 0): [a.id]} and not plan.stops and not plan.fails


def test_before_any_history_only_stalls_count() -> None:
    burning = node("a", run(0, run_s=500, cpu_s=500))  # 500 CPU s: would be a runaway with a history
    idle = node("b")
    assert not judge(facts([burning, idle], finished={1, 2, 3}, cost=None), STALL_S).launches
    plan = judge(facts([burning, idle], finished={1, 2, 3}, cost=1.0), STALL_S)  # 1 s/MP: ~0.3 s a strip
    assert [(x.index, x.reason) for x in plan.launches] == [(0, "hung")] and "over 10 times" in plan.launches[0].why


def test_a_strip_running_at_full_speed_is_never_copied_however_long() -> None:
    slow_class = node("a", run(0, run_s=120, cpu_s=119))  # a costly class: 120 s so far, still at full speed
    plan = judge(facts([slow_class, node("b")], finished={1, 2, 3}, cost=400.0), STALL_S)
    assert not plan.launches and not plan.stops


def test_a_crawling_strip_is_copied_to_an_idle_node_when_the_copy_would_finish_well_before_it() -> None:
    crawler = node("a", run(0, run_s=3.0, cpu_s=0.3))  # 10 % speed; expected 2.16 CPU s (10 s/MP x 0.216 MP)
    plan = judge(facts([crawler, node("b")], finished={1, 2, 3}, cost=10.0), STALL_S)
    assert [(x.index, x.reason, x.target.hostname) for x in plan.launches] == [(0, "slow", "b@h")]
    assert "runs at 10% of full speed" in plan.launches[0].why


def test_no_copy_for_a_crawler_without_an_idle_node_nor_while_strips_still_wait_nor_if_nearly_done() -> None:
    crawler = run(0, run_s=3.0, cpu_s=0.3)  # as above: copied if a node were idle and nothing queued
    assert judge(facts([node("a", crawler), node("b")], finished={1, 2, 3}, cost=10.0), STALL_S).launches
    busy = node("b", run(1))
    assert not judge(facts([node("a", crawler), busy], finished={2, 3}, cost=10.0), STALL_S).launches
    queued = facts([node("a", crawler), node("b")], finished={1, 2}, cost=10.0)  # strip 3 waits in the queue
    assert not judge(queued, STALL_S).launches
    nearly = node("a", run(0, run_s=12.0, cpu_s=2.1))  # expected 2.16 CPU s: nearly done
    assert not judge(facts([nearly, node("b")], finished={1, 2, 3}, cost=10.0), STALL_S).launches
    one_copy = facts([node("a", crawler), node("b")], finished={1, 2, 3}, cost=10.0,
                     copied={(JOB, 0): [{"node": "b@h[13]", "reason": "slow"}]})
    assert not judge(one_copy, STALL_S).launches  # a crawler gets one copy


def test_copies_go_only_to_nodes_that_run_the_operation_with_the_submitters_code() -> None:
    a = node("a", run(0, idle_s=10))
    other_version = node("b", plugin=False)
    plan = judge(facts([a, other_version], finished={1, 2, 3}), STALL_S)
    assert not plan.launches and not plan.fails  # no node to copy to: the hung process is stopped here
    assert [(s.node, s.pid) for s in plan.stops] == [(a.id, 100)]


def test_once_a_strip_finished_its_other_runs_are_stopped_but_not_the_winner() -> None:
    a = node("a", run(0, pid=100, idle_s=9))
    b = node("b", run(0, pid=200))
    plan = judge(facts([a, b], finished={0, 1, 2, 3}, copied={(JOB, 0): [{"node": b.id, "reason": "hung"}]},
                       winners={(JOB, 0): ("b@h", 200)}), STALL_S)
    assert [(s.node, s.pid) for s in plan.stops] == [(a.id, 100)] and not plan.launches
    plain = judge(facts([a], finished={0, 1, 2, 3}), STALL_S)  # never copied: it is only acknowledging
    assert not plain.stops


def test_a_copy_on_its_way_or_a_healthy_run_carries_a_hung_strip() -> None:
    a = node("a", run(0, idle_s=9))
    assert not judge(facts([a, node("b")], finished={1, 2, 3}, pending={(JOB, 0): "b@h[13]"}), STALL_S).launches
    healthy_copy = node("b", run(0, pid=200))
    plan = judge(facts([a, healthy_copy], finished={1, 2, 3}), STALL_S)
    assert not plan.launches and not plan.stops and not plan.fails


def test_a_strip_hung_on_every_node_fails_its_job_naming_it_and_stops_its_processes() -> None:
    a = node("a", run(2, pid=100, idle_s=9))
    b = node("b", run(2, pid=200, idle_s=4))
    plan = judge(facts([a, b], finished={0, 1, 3}, hung_on={(JOB, 2): {a.id}}), STALL_S)
    assert not plan.launches
    assert len(plan.fails) == 1 and plan.fails[0].text.startswith(
        f"strip 3/4 (rows 400-600) hung on every worker it ran on ({a.id}, {b.id})")
    assert sorted(s.pid for s in plan.stops) == [100, 200]


def test_on_a_cluster_of_one_node_a_hung_process_is_stopped_for_celery_to_run_the_strip_again() -> None:
    a = node("a", run(1, idle_s=5), slots=2)
    plan = judge(facts([a], finished={0, 2, 3}), STALL_S)
    assert not plan.launches and not plan.fails
    assert [(s.node, s.task_id, s.pid) for s in plan.stops] == [(a.id, f"{JOB}.strip1", 100)]
