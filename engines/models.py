"""The two reference architectures (torch): the speech model and the action model.

Imported only by export and training code; the node runs the exported ONNX files. Both models
take fixed-shape float32 inputs (batch 1) listed in the `*_INPUTS` tables and return a dict of
the outputs listed in the `*_OUTPUTS` tables, in that order. Missing modalities are marked by
`*_valid` inputs (1 real, 0 missing): a missing token's content is zeroed and no other token
attends to it, so training with modality dropout is just zeroing the valid inputs.
"""

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
            # Four mel frames (40 ms) per audio token, aligned with one video frame.
            self.audio_stem = nn.Conv1d(
                N_MELS, D_MODEL, AUDIO_FRAMES_PER_TOKEN, stride=AUDIO_FRAMES_PER_TOKEN
            )
            # Per frame: 48x48 -> 24 -> 12 -> 6 -> one D_MODEL vector. ReLU, not GELU: it
            # fuses into the convolutions and GELU here cost about 1 ms per call on one core.
            self.video_stem = nn.Sequential(
                nn.Conv2d(1, 16, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, 64, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(64, D_MODEL, 6),
            )
            self.cls = nn.Parameter(_init(1, 1, D_MODEL))
            self.audio_embed = nn.Parameter(_init(1, VIDEO_FRAMES, D_MODEL))  # modality + time
            self.video_embed = nn.Parameter(_init(1, VIDEO_FRAMES, D_MODEL))
            self.encoder = _Encoder()
            self.frame_head = nn.Linear(2 * D_MODEL, 2)  # [vad, speaker] from both tokens at t
            self.command_head = nn.Linear(D_MODEL, len(COMMANDS))

    def forward(
        self, audio_mel: Tensor, audio_valid: Tensor, video: Tensor, video_valid: Tensor
    ) -> dict[str, Tensor]:
        batch = audio_mel.shape[0]
        audio = self.audio_stem(audio_mel.transpose(1, 2)).transpose(1, 2)  # [B, 16, D]
        # An audio token is valid only if all its mel frames are.
        audio_tok_valid = audio_valid.reshape(batch, VIDEO_FRAMES, -1).amin(dim=-1)

        frames = video.reshape(batch * VIDEO_FRAMES, 1, MOUTH_SIZE, MOUTH_SIZE)
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

    Tokens: 36 image patches (16x16), one joint-state token, one command token and 20 learned
    action queries. `actions` are the current joint positions plus predicted offsets for the
    next ACTION_HORIZON steps, ACTION_STEP_MS apart. Weights are initialised from `seed`.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        n_patches = (IMAGE_SIZE // PATCH) ** 2
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.patch_stem = nn.Conv2d(3, D_MODEL, PATCH, stride=PATCH)
            self.joint_stem = nn.Linear(2 * N_JOINTS, D_MODEL)
            self.command_stem = nn.Linear(len(COMMANDS), D_MODEL)
            self.patch_embed = nn.Parameter(_init(1, n_patches, D_MODEL))
            self.joint_embed = nn.Parameter(_init(1, 1, D_MODEL))
            self.command_embed = nn.Parameter(_init(1, 1, D_MODEL))
            self.queries = nn.Parameter(_init(1, ACTION_HORIZON, D_MODEL))
            self.encoder = _Encoder()
            self.action_head = nn.Linear(D_MODEL, N_JOINTS)

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
        joint = self.joint_stem(joints).unsqueeze(1)
        command_tok = self.command_stem(command).unsqueeze(1)
        tokens = torch.cat(
            [
                patches * image_valid.unsqueeze(-1) + self.patch_embed,
                joint + self.joint_embed,
                command_tok * command_valid.unsqueeze(-1) + self.command_embed,
                self.queries.expand(batch, -1, -1),
            ],
            dim=1,
        )
        # Joint and query tokens are always valid, so no query sees only masked keys.
        always = torch.ones_like(image_valid).expand(batch, 1 + ACTION_HORIZON)
        valid = torch.cat(
            [image_valid.expand(batch, n_patches), always[:, :1], command_valid, always[:, 1:]], 1
        )
        x = self.encoder(tokens, _key_bias(valid))
        deltas = self.action_head(x[:, -ACTION_HORIZON:])
        return {"actions": joints[:, None, :N_JOINTS] + deltas}


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

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(D_MODEL)

    def forward(self, x: Tensor, key_bias: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, key_bias)
        return self.norm(x)


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(D_MODEL)
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.proj = nn.Linear(D_MODEL, D_MODEL)
        self.norm2 = nn.LayerNorm(D_MODEL)
        self.ff = nn.Sequential(nn.Linear(D_MODEL, FF_DIM), nn.GELU(), nn.Linear(FF_DIM, D_MODEL))

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
