"""``tokenmerge train``: fine-tune a timm model with token merging, on one process or
under ``torchrun``, with checkpoints that survive interruptions.

For notebooks and scripts::

    from tokenmerge.tools.train import TrainConfig, train
    history = train(TrainConfig(model="vit_small_patch16_224", checkpoint="vit_s.safetensors",
                                data="flowers", output="runs/flowers-r13", r=13, epochs=10))

The data folder holds ``train/<class>/<image>`` and ``val/<class>/<image>`` (or
another validation folder, such as ``test/``, named by ``val_split``); classes
are the sorted folder names of ``train/`` (written to ``classes.txt`` in the output
folder, a class map for ``tokenmerge eval --class-map``), and the classifier is
re-created for their number. Images go through the model's own timm data config:
timm's training transform (random resized crop, flip, colour jitter) with
``augment``, its evaluation transform otherwise and for validation.

Merging while training
----------------------
:func:`tokenmerge.apply` works on a model in ``train()`` mode: dropout and drop path
stay active, and gradients flow through the size-weighted merges and through
proportional attention (the log-size bias is a function of the sizes, which carry
no gradient, so the matching itself is a fixed choice per step, as in the paper).
Keep ``prop_attn=True`` during training: the model then learns with the same
attention it is evaluated with, where a merged token speaks for all of its patches;
training without it and evaluating with it (or the reverse) changes the attention
the weights were fitted to. Under autocast the sizes and the size-weighted sums stay
float32 and only the result is cast back, so bfloat16 and float16 lose no range
however many patches a token stands for.

Checkpoints
-----------
After every epoch the first process writes ``OUTPUT/epoch-N/`` (into a hidden
partial folder, renamed when complete, so an interruption never leaves a half-written
checkpoint): ``model.safetensors`` (the weights, plain timm keys),
``optimizer.safetensors`` (the optimizer's tensors) and ``state.json`` (epoch, step,
configuration, the optimizer's other values, the metrics so far and the SHA-256 of
both weight files; nothing pickled). ``OUTPUT/model.safetensors`` is the latest
weights. Running the same configuration again resumes after the last finished
epoch, and gives the same weights as an uninterrupted run: the random state of
every epoch is derived from the seed, the epoch and the process, the augmentation
of every image from the seed, the epoch and the image (so the number of data
loading workers changes nothing), and the learning rate schedule from the step. A
checkpoint of another configuration (the device type included: kernels differ), or
whose files do not match their checksums, is refused. A loss that stops being
finite ends the run with an error, every finished epoch kept. ``metrics.csv`` and
``metrics.png`` hold a row and a point per epoch, ``steps.csv`` the loss of every step.

Processes
---------
Under ``torchrun --nproc_per_node=N`` every process trains on its share of each
global batch (``batch_size / N`` images, from a ``DistributedSampler``) within
``DistributedDataParallel`` (gloo on CPU, NCCL on CUDA); gradients are averaged, so
with the same seed a step sees the images and takes the update of a single process.
Validation takes whole batches in turn and sums the counts, which gives exactly the
accuracy of a single process. Only the first process writes files and prints.
"""
from .command import add_parser
from .config import TrainConfig
from .loop import train
from .steps import evaluate_accuracy, train_step

__all__ = ["TrainConfig", "add_parser", "evaluate_accuracy", "train", "train_step"]
