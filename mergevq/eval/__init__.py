"""Metrics only: reconstruction (PSNR, SSIM, LPIPS, code usage), features and FID / IS / sFID /
precision-recall, the linear probe, and the tokenizer and generator evaluations built on them."""
