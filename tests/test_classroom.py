"""A small class in real browsers: three students on a fresh `streamlit run` press Train at
once, each with a seed of their own (three real computations, more runs than 2 cores).
Everyone's curve goes live and everyone gets a result, without an exception.

The same code as `python -m bench.classroom 3 --distinct-seeds --steps 50 --device cpu`;
the benchmark's timings are not asserted here, only that the class works. It drives the
pages with Playwright's async API (one coroutine per student), so it launches its own
chromium rather than the shared sync `browser` fixture; `sync_api` skips it where chromium
is missing. About 40 s on a quiet 2-core machine."""

STUDENTS, STEPS = 3, 50
CLASS_S = 90  # from the clicks to the last result card


def test_three_students_press_train_at_once_and_all_see_live_curves_and_results(sync_api):
    from bench.classroom import classroom, details

    r = classroom(STUDENTS, distinct=True, steps=STEPS, device="cpu", timeout=CLASS_S, storage=False)
    report = details(r)  # a line per student: first curve, result, live updates, errors
    assert len(r.results) == STUDENTS, report
    assert r.exceptions == 0 and not r.errors, report
    assert not r.foreign, f"the app asked other hosts: {sorted(set(r.foreign))[:5]}"
    for s in r.students:
        assert s.log["resultText"] == f"Results on {r.task}", report
        # live: the page showed the run part-way (0 < step < budget) before its result card
        assert s.live_steps(), report
