"""`esd attack`: try to bring an erased concept back with an adversarial prompt, and measure how often it works.

Two attacks, both white-box on the erased UNet and both steered by the denoising loss on images of the concept
that the *original* model makes:

- `unlearndiff` (Zhang et al. 2024, "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy
  To Generate Unsafe Images ... For Now", UnlearnDiffAtk): k prefix token embeddings optimised per prompt, then
  projected to real vocabulary tokens, so the attack is a text prompt anyone can type;
- `textual-inversion` (Pham et al. 2024, "Circumventing Concept Erasure Methods For Text-to-Image Generative
  Models"): one new token embedding learned for the concept on the erased model.

Modules: `embeddings` (the text-encoder plumbing: slots, injection, projection, the denoising loss),
`unlearndiff`, `inversion`, `judges` (the suites' per-image verdicts) and `command` (the sub-command, resume,
metrics and report).
"""
