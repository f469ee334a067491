"""Peak extra memory of one forward+backward of a contrastive loss, in a fresh process.

    python tests/support/memory_probe.py {ours,open_clip} B D [BLOCK_ELEMENTS]

Prints a JSON line: peak_extra_bytes (peak RSS during the call minus RSS before it,
with the kernel's high-water mark reset through /proc/self/clear_refs) and the loss.
BLOCK_ELEMENTS overrides the CPU path's block of S (default 2^23 elements), so a small
batch can show the difference between O(block) and O(B^2) growth.
"""
import json
import sys

import torch


def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: current RSS, VmHWM: its peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    impl, B, D = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if impl == "ours":
        import clip_fast.contrastive_ops
        from clip_fast import ContrastiveLoss

        if len(sys.argv) > 4:
            clip_fast.contrastive_ops.CPU_BLOCK_ELEMENTS = int(sys.argv[4])

        loss_fn = ContrastiveLoss()
    else:
        from open_clip.loss import ClipLoss

        loss_fn = ClipLoss()
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(14.3, requires_grad=True)
    # Warm up allocator and thread pools on a small problem, then settle the baseline:
    # the gradients' own storage (2 * B * D floats) is allocated up front so it is not
    # counted as the loss's extra memory.
    loss_fn(image[:8], text[:8], scale).backward()
    image.grad = torch.zeros_like(image)
    text.grad = torch.zeros_like(text)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = status_bytes("VmRSS")
    loss = loss_fn(image, text, scale)
    loss.backward()
    peak = status_bytes("VmHWM")
    print(json.dumps({"impl": impl, "B": B, "D": D, "peak_extra_bytes": peak - before, "loss": loss.item()}))


if __name__ == "__main__":
    main()
