"""The two reference architectures (torch): the speech model and the action model.

Imported only by export and training code; the node runs the exported ONNX files. Both models
take fixed-shape float32 inputs (batch 1) listed in the `*_INPUTS` tables and return a dict of
the outputs listed in the `*_OUTPUTS` tables, in that order. Missing modalities are marked by
`*_valid` inputs (1 real, 0 missing): a missing token's content is zeroed and no other token
attends to it, so training with modality dropout is just zeroing the valid inputs.
"""

import math

import numpy as np
import torch
from torch import Tensor, nn

from engines.vocabulary import COMMANDS

__all__ = [
    "ACTION_HORIZON",
    "ACTION_INPUTS",
    "ACTION_OUTPUTS",
    "ACTION_STEP_MS",
    "COMMANDS",
    "SPEECH_INPUTS",
    "SPEECH_OUTPUTS",
    "ActionModel",
    "SpeechModel",
    "random_feeds",
]

D_MODEL = 128
HEADS = 4
LAYERS = 3
FF_DIM = 256
SPEECH_LAYERS = 4  # the speech model has more to learn (three tasks, two modalities)
SPEECH_FF_DIM = 384

AUDIO_FRAMES = 64  # log-mel frames, 10 ms hop: 0.64 s
N_MELS = 40
VIDEO_FRAMES = 16  # 25 fps: 0.64 s
MOUTH_SIZE = 48
AUDIO_FRAMES_PER_TOKEN = AUDIO_FRAMES // VIDEO_FRAMES  # one audio token per video frame (40 ms)

IMAGE_SIZE = 96
PATCH = 16
N_JOINTS = 3
ACTION_HORIZON = 20
ACTION_STEP_MS = 20

SPEECH_INPUTS: dict[str, tuple[int, ...]] = {
    "audio_mel": (1, AUDIO_FRAMES, N_MELS),
    "audio_valid": (1, AUDIO_FRAMES),
    "video": (1, VIDEO_FRAMES, MOUTH_SIZE, MOUTH_SIZE),
    "video_valid": (1, VIDEO_FRAMES),
}
SPEECH_OUTPUTS: dict[str, tuple[int, ...]] = {
    "vad_logits": (1, VIDEO_FRAMES),
    "speaker_logits": (1, VIDEO_FRAMES),
    "command_logits": (1, len(COMMANDS)),
}
ACTION_INPUTS: dict[str, tuple[int, ...]] = {
    "image": (1, 3, IMAGE_SIZE, IMAGE_SIZE),
    "image_valid": (1, 1),
    "joints": (1, 2 * N_JOINTS),  # positions (rad) then velocities (rad/s)
    "command": (1, len(COMMANDS)),
    "command_valid": (1, 1),
}
ACTION_OUTPUTS: dict[str, tuple[int, ...]] = {
    "actions": (1, ACTION_HORIZON, N_JOINTS),  # joint targets (rad), ACTION_STEP_MS apart
}

# Additive attention bias for masked keys. Finite and within float16 range so that a TensorRT
# fp16 build neither overflows to -inf nor produces 0 * inf = NaN.
_MASKED = -1.0e4


class _MouthStem(nn.Module):
    """One mouth crop (48x48) -> one D_MODEL vector: 4x4 pixel patches -> 32 features, 2x2
    groups of those -> 64, the 6x6 grid -> D_MODEL, ReLU between. The same arithmetic as
    non-overlapping convolutions, as matrix products: CPU convolutions with so few channels
    cost three quarters of every training step, and the drawn mouth's shape is coarse."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Linear(4 * 4, 32)
        self.group = nn.Linear(2 * 2 * 32, 64)
        self.out = nn.Linear(6 * 6 * 64, D_MODEL)

    def forward(self, frames: Tensor) -> Tensor:  # [N, 48, 48] -> [N, D_MODEL]
        n = frames.shape[0]
        x = frames.reshape(n, 12, 4, 12, 4).permute(0, 1, 3, 2, 4).reshape(n, 12, 12, 16)
        x = torch.relu(self.patch(x))
        x = x.reshape(n, 6, 2, 6, 2, 32).permute(0, 1, 3, 2, 4, 5).reshape(n, 6, 6, 128)
        x = torch.relu(self.group(x))
        return self.out(x.reshape(n, 6 * 6 * 64))


class SpeechModel(nn.Module):
    """Multimodal transformer: log-mel audio tokens + mouth-crop video tokens + a CLS token.

    Outputs per video frame `vad_logits` (voice activity) and `speaker_logits` (is the visible
    person the one talking), and `command_logits` over `COMMANDS` from the CLS token.
    Weights are initialised deterministically from `seed`.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # A local spectro-temporal layer (30 ms context per mel frame) before four mel
            # frames (40 ms) become one audio token, aligned with one video frame: a linear
            # patch alone left clean audio-only commands at 64% on unseen voices.
            self.audio_stem = nn.Sequential(
                nn.Conv1d(N_MELS, D_MODEL, 3, padding=1),
                nn.ReLU(),
                nn.Conv1d(D_MODEL, D_MODEL, AUDIO_FRAMES_PER_TOKEN, stride=AUDIO_FRAMES_PER_TOKEN),
            )
            self.video_stem = _MouthStem()
            self.cls = nn.Parameter(_init(1, 1, D_MODEL))
            self.audio_embed = nn.Parameter(_init(1, VIDEO_FRAMES, D_MODEL))  # modality + time
            self.video_embed = nn.Parameter(_init(1, VIDEO_FRAMES, D_MODEL))
            self.encoder = _Encoder(SPEECH_LAYERS, SPEECH_FF_DIM)
            self.frame_head = nn.Linear(2 * D_MODEL, 2)  # [vad, speaker] from both tokens at t
            self.command_head = nn.Linear(D_MODEL, len(COMMANDS))

    def forward(
        self, audio_mel: Tensor, audio_valid: Tensor, video: Tensor, video_valid: Tensor
    ) -> dict[str, Tensor]:
        batch = audio_mel.shape[0]
        # log(mel + 1e-6) spans about -14 (silence) to +6: bring it near unit scale.
        # Missing frames are zeroed before the stem: its 3-frame convolution would otherwise
        # carry a gap's content into the valid token beside it.
        audio_mel = (audio_mel * 0.25 + 1.5) * audio_valid.unsqueeze(-1)
        audio = self.audio_stem(audio_mel.transpose(1, 2)).transpose(1, 2)  # [B, 16, D]
        # An audio token is valid only if all its mel frames are.
        audio_tok_valid = audio_valid.reshape(batch, VIDEO_FRAMES, -1).amin(dim=-1)

        frames = video.reshape(batch * VIDEO_FRAMES, MOUTH_SIZE, MOUTH_SIZE)
        vid = self.video_stem(frames).reshape(batch, VIDEO_FRAMES, D_MODEL)

        # Invalid tokens keep their embeddings (so they still ask "what happens at time t?")
        # but carry no content and are masked as keys.
        tokens = torch.cat(
            [
                self.cls.expand(batch, -1, -1),
                audio * audio_tok_valid.unsqueeze(-1) + self.audio_embed,
                vid * video_valid.unsqueeze(-1) + self.video_embed,
            ],
            dim=1,
        )
        # The CLS key is always valid, so no query sees only masked keys.
        cls_valid = torch.ones_like(video_valid[:, :1])
        valid = torch.cat([cls_valid, audio_tok_valid, video_valid], dim=1)
        x = self.encoder(tokens, _key_bias(valid))

        audio_out = x[:, 1 : 1 + VIDEO_FRAMES]
        video_out = x[:, 1 + VIDEO_FRAMES :]
        per_frame = self.frame_head(torch.cat([audio_out, video_out], dim=-1))
        return {
            "vad_logits": per_frame[..., 0],
            "speaker_logits": per_frame[..., 1],
            "command_logits": self.command_head(x[:, 0]),
        }


class ActionModel(nn.Module):
    """Action-chunking transformer: image patches + joint state + command -> a chunk of targets.

    Tokens: 36 image patches (16x16), one joint-state token, one command token, one target
    token and 20 learned action queries. The target token is a spatial-softmax keypoint (as
    in deep spatial autoencoders for visuomotor learning): the command selects a colour (a
    learned vector per command, initialised from the colour words' RGB), every pixel is
    scored by its closeness to it, and the softmax-weighted mean pixel position says where
    the named thing is. Without it the model must learn a multiplicative command x image
    interaction through attention alone, which it did not within an hour of training.
    `actions` are the current joint positions plus predicted offsets for the next
    ACTION_HORIZON steps, ACTION_STEP_MS apart. Weights are initialised from `seed`.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        n_patches = (IMAGE_SIZE // PATCH) ** 2
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.patch_stem = nn.Conv2d(3, D_MODEL, PATCH, stride=PATCH)
            # Joints with the sines and cosines kinematics is made of; the target position
            # with Fourier features, so the learned inverse kinematics can be precise.
            self.joint_stem = nn.Linear(4 * N_JOINTS, D_MODEL)
            self.command_stem = nn.Linear(len(COMMANDS), D_MODEL)
            self.target_stem = nn.Linear(3 + 4 * len(_FOURIER_SCALES), D_MODEL)
            self.patch_embed = nn.Parameter(_init(1, n_patches, D_MODEL))
            self.joint_embed = nn.Parameter(_init(1, 1, D_MODEL))
            self.command_embed = nn.Parameter(_init(1, 1, D_MODEL))
            self.target_embed = nn.Parameter(_init(1, 1, D_MODEL))
            self.queries = nn.Parameter(_init(1, ACTION_HORIZON, D_MODEL))
            self.encoder = _Encoder(LAYERS, FF_DIM)
            self.action_head = nn.Linear(D_MODEL, N_JOINTS)
            colours = torch.full((len(COMMANDS), 3), 0.5)
            for name, rgb in _COLOUR_WORDS.items():
                colours[COMMANDS.index(name)] = torch.tensor(rgb) / 255.0
            self.command_colour = nn.Parameter(colours)
            self.log_sharpness = nn.Parameter(torch.tensor(math.log(100.0)))
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, IMAGE_SIZE),
                                torch.linspace(-1, 1, IMAGE_SIZE), indexing="ij")
        self.register_buffer("pixel_xy", torch.stack([xs, ys], -1).reshape(-1, 2),
                             persistent=False)
        self.register_buffer("fourier_scales", torch.tensor(_FOURIER_SCALES) * math.pi,
                             persistent=False)

    def forward(
        self,
        image: Tensor,
        image_valid: Tensor,
        joints: Tensor,
        command: Tensor,
        command_valid: Tensor,
    ) -> dict[str, Tensor]:
        batch = image.shape[0]
        patches = self.patch_stem(image).flatten(2).transpose(1, 2)  # [B, 36, D]
        n_patches = patches.shape[1]
        position = joints[:, :N_JOINTS]
        joint = self.joint_stem(torch.cat([joints, position.sin(), position.cos()], -1))
        joint = joint.unsqueeze(1)
        command_tok = self.command_stem(command).unsqueeze(1)
        colour = command @ self.command_colour  # [B, 3]
        distance = ((image - colour[:, :, None, None]) ** 2).sum(1).flatten(1)  # [B, H*W]
        weights = torch.softmax(-distance * self.log_sharpness.exp(), dim=-1)
        where = weights @ self.pixel_xy  # [B, 2]
        peak = weights.amax(dim=-1, keepdim=True) * (IMAGE_SIZE * IMAGE_SIZE / 64)
        angles = (where[:, :, None] * self.fourier_scales).flatten(1)  # [B, 2 * scales]
        target = self.target_stem(torch.cat([where, peak, angles.sin(), angles.cos()], -1))
        target = target.unsqueeze(1)
        target_valid = image_valid * command_valid
        tokens = torch.cat(
            [
                patches * image_valid.unsqueeze(-1) + self.patch_embed,
                joint + self.joint_embed,
                command_tok * command_valid.unsqueeze(-1) + self.command_embed,
                target * target_valid.unsqueeze(-1) + self.target_embed,
                self.queries.expand(batch, -1, -1),
            ],
            dim=1,
        )
        # Joint and query tokens are always valid, so no query sees only masked keys.
        always = torch.ones_like(image_valid).expand(batch, 1 + ACTION_HORIZON)
        valid = torch.cat(
            [image_valid.expand(batch, n_patches), always[:, :1], command_valid, target_valid,
             always[:, 1:]], 1
        )
        x = self.encoder(tokens, _key_bias(valid))
        deltas = self.action_head(x[:, -ACTION_HORIZON:])
        return {"actions": joints[:, None, :N_JOINTS] + deltas}


_FOURIER_SCALES = (1.0, 2.0, 4.0, 8.0, 16.0)
# RGB of the colours the colour words name: the initial colour vector of those commands.
_COLOUR_WORDS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
                 "yellow": (235, 205, 20)}


def random_feeds(
    inputs: dict[str, tuple[int, ...]], rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Random float32 feeds for `inputs`: `*_valid` masks 0/1 (mostly 1), other inputs N(0, 1)."""
    feeds = {}
    for name, shape in inputs.items():
        if name.endswith("_valid"):
            feeds[name] = (rng.random(shape) < 0.75).astype(np.float32)
        else:
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


class _Encoder(nn.Module):
    """Pre-norm transformer encoder with an additive key bias, written out so it exports to
    plain MatMul/Softmax ONNX ops on every backend."""

    def __init__(self, layers: int, ff_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(ff_dim) for _ in range(layers))
        self.norm = nn.LayerNorm(D_MODEL)

    def forward(self, x: Tensor, key_bias: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, key_bias)
        return self.norm(x)


class _Layer(nn.Module):
    def __init__(self, ff_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(D_MODEL)
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.proj = nn.Linear(D_MODEL, D_MODEL)
        self.norm2 = nn.LayerNorm(D_MODEL)
        self.ff = nn.Sequential(nn.Linear(D_MODEL, ff_dim), nn.GELU(), nn.Linear(ff_dim, D_MODEL))

    def forward(self, x: Tensor, key_bias: Tensor) -> Tensor:
        batch, length, _ = x.shape
        head_dim = D_MODEL // HEADS
        qkv = self.qkv(self.norm1(x)).reshape(batch, length, 3, HEADS, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, head_dim]
        scores = q @ k.transpose(-2, -1) * head_dim**-0.5 + key_bias
        attended = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, length, D_MODEL)
        x = x + self.proj(attended)
        return x + self.ff(self.norm2(x))


def _key_bias(valid: Tensor) -> Tensor:
    """[B, L] 0/1 validity -> [B, 1, 1, L] additive attention bias (0 or _MASKED)."""
    bias = torch.where(valid > 0.5, 0.0, _MASKED)
    return bias[:, None, None, :]


def _init(*shape: int) -> Tensor:
    return torch.randn(*shape) * 0.02
