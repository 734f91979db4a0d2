"""`convllava quickstart`: fine-tune the tiny model on real photos in about a minute and ask about them.

Three steps, each the project's own:
1. data: the eight photos that ship with scikit-image, a caption and a one-word subject each
   (`pipelines.demo.data` with its photos only), preprocessed into shards by `pipelines.preprocess` in this process
   (`in_process`: the same stages without Ray, which would take longer to start than the 16 samples take);
2. training: the stage recipe through `convllava train --local`'s code path (`jobs.train.local.run_local`) with
   `jobs/configs/quickstart.yaml`: the tiny preset, every part trained (tower, projector, LM), bucketed at the
   photos' own aspect ratios, Vicuna template, labels on replies only;
3. answers: the final checkpoint reloaded (`convllava.modeling.checkpoint.load_model`) and each photo asked what it shows.
   A model that only learnt the text would answer the same thing for every photo; the per-photo answers show the
   image path works.

Running it again in the same work dir reuses the shards and resumes the run (from its final checkpoint: no step
runs again).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from jobs.tracking.vocabulary import TRAIN_LOSS
from jobs.train.config import CONFIG_DIR, StageConfig
from jobs.train.local import METRICS_FILE, run_local

QUICKSTART_CONFIG = CONFIG_DIR / "quickstart.yaml"


def prepare_quickstart_data(workdir: str | Path, stage: StageConfig) -> Path:
    """The sample photos' data set in WORKDIR/data and its shards in WORKDIR/shards, preprocessed as the stage's
    model reads them (its preset's resolution, image mode and template, the stage's tokenizer); returns the shards'
    folder.

    The data set is written once: copying the photos again would give them new modification times, which
    preprocessing takes for changed images (new shards, which a finished run's checkpoint was not trained on)."""
    from convllava.modeling.config import ConvLlavaConfig
    from pipelines.config import Mixture, PreprocessConfig
    from pipelines.demo.data import generate_demo_data
    from pipelines.preprocess import run_preprocess

    workdir = Path(workdir)
    data, shards = workdir / "data", workdir / "shards"
    if not (data / "metadata.json").is_file():  # written last
        generate_demo_data(data, n_caption=0, n_instruct=0, n_eval=0, with_photos=True)
    mixture = Mixture.from_yaml(data / "mixture.yaml")
    model = ConvLlavaConfig.from_preset(stage.preset)
    config = PreprocessConfig(
        resolution=model.image_resolution,
        mode=model.image_mode,
        template=model.template,
        tokenizer=stage.tokenizer,
        max_length=512,
    )
    run_preprocess(mixture, config, str(shards), echo=lambda *_: None, in_process=True)
    return shards


def run_quickstart(workdir: str | Path = "work/quickstart", overrides: Sequence[str] = ()) -> int:
    """Prepare the photos' shards, train the quickstart stage on them, reload its model and ask each photo what it
    shows. Returns 0 when every photo is named.

    Args:
        overrides: `key=value` overrides of jobs/configs/quickstart.yaml, as `convllava train` takes them.
    """
    from convllava.data.sample_images import sample_photos
    from convllava.modeling.checkpoint import load_model
    from convllava.modeling.inference import generate
    from convllava.processing.image_processing import load_image
    from pipelines.demo.data import PHOTO_QUESTION

    workdir = Path(workdir)
    start = time.time()
    config = StageConfig.from_yaml(QUICKSTART_CONFIG, [f"data={workdir / 'shards'}", *overrides])
    shards = prepare_quickstart_data(workdir, config)
    print(f"shards of {len(sample_photos())} photos (a caption and a subject each) in {shards}")
    print(f"train: convllava train --local --config {QUICKSTART_CONFIG} --workdir {workdir} data={shards}")
    result = run_local(config, workdir / "runs")
    losses = [json.loads(line)[TRAIN_LOSS] for line in (workdir / "runs" / config.name / METRICS_FILE).open()]
    print(f"trained {result.steps} steps: loss {losses[0]:.3f} → {losses[-1]:.3f} ({time.time() - start:.1f}s so far)")

    model, processor = load_model(result.model_uri)
    photos = sample_photos()
    answers = generate(model, processor, [PHOTO_QUESTION] * len(photos), [load_image(p.path) for p in photos])
    correct = 0
    print(f"\n{'photo':24s} {'expected':12s} answer")
    for photo, answer in zip(photos, answers, strict=True):
        ok = answer.lower().strip(" .") == photo.subject
        correct += ok
        print(f"{photo.path.name:24s} {photo.subject:12s} {answer!r} {'✓' if ok else '✗'}")
    print(
        f"\n{correct}/{len(photos)} photos named correctly in {time.time() - start:.1f}s; model at {result.model_uri}"
    )
    print(f'try: convllava chat --model {result.model_uri} --image {photos[1].path} "{PHOTO_QUESTION}"')
    return 0 if correct == len(photos) else 1
