"""Spying on the steps a command builds: wrap a step maker so that every call of the steps it
makes is recorded before it runs."""


def batch_rows_seen(monkeypatch, module, maker: str) -> list:
    """Replace module.<maker> (a function that makes an eval or train step taking
    (params, images, ...)) for the test's duration; returns the list that collects len(images) of
    every call of the steps it makes, in order."""
    rows = []
    make = getattr(module, maker)

    def recording(*args, **kwargs):
        step = make(*args, **kwargs)

        def recorded_step(params, images, *rest):
            rows.append(len(images))
            return step(params, images, *rest)
        return recorded_step

    monkeypatch.setattr(module, maker, recording)
    return rows
