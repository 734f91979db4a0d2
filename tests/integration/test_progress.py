"""The progress view: lines in a log, one live line in a terminal (a real pty), steps from a Ray worker."""

from __future__ import annotations

import pytest

from jobs.progress import FeedMetrics, StepFeed

pytestmark = pytest.mark.integration


def test_steps_from_a_ray_worker_reach_the_driver(ray_local):
    import ray

    seen = []
    feed = StepFeed(lambda step, total, metrics: seen.append((step, total, metrics["train/loss"])))

    class Inner:
        logged = []

        def log(self, step, metrics):
            self.logged.append(step)

        def close(self):
            return None

    @ray.remote(num_cpus=0)
    def rank0(handle):
        inner = Inner()
        sink = FeedMetrics(inner, handle, total=lambda: 30)
        for step in (10, 20, 30):
            sink.log(step, {"train/loss": 7.0 - step / 10})
        sink.close()  # as the recipe does after its last step: the pushes are in the queue when it returns
        return inner.logged

    assert ray.get(rank0.remote(feed.handle)) == [10, 20, 30]  # the inner sink still gets every step
    feed.close()  # delivers what is left
    assert seen == [(10, 30, 6.0), (20, 30, 5.0), (30, 30, 4.0)]
