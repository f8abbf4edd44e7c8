"""Spying on the steps a command builds: wrap a step maker (vit.step.make_eval_step,
vit.parallel.make_parallel_train_step, ...) so that every call of a step it makes is followed by
a callback, which can record what the step was given or act at a known step."""


def after_each_step(monkeypatch, module, maker: str, callback) -> None:
    """Replace module.<maker> for the test's duration: every step it makes runs as before, then
    calls callback(*the step's arguments)."""
    make = getattr(module, maker)

    def spying(*args, **kwargs):
        step = make(*args, **kwargs)

        def spied_step(*step_args):
            out = step(*step_args)
            callback(*step_args)
            return out
        return spied_step

    monkeypatch.setattr(module, maker, spying)


def batch_rows_seen(monkeypatch, module, maker: str) -> list:
    """The list that collects len(images) of every call of the steps module.<maker> makes (steps
    taking (params, images, ...)), in order."""
    rows = []
    after_each_step(monkeypatch, module, maker, lambda params, images, *rest: rows.append(len(images)))
    return rows
