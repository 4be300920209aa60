"""A small run of every CUDA kernel, for compute-sanitizer (benchmarks/gpu_check.sh): each dtype,
odd shapes, strides and groups, forward and backward (small grids and register-blocked ones,
with quad columns and a split batch), and the ridge statistics and solve."""

import torch

import reggan_ext


def main():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for kernel, stride, dilation, groups, size in [(3, 1, 1, 3, (13, 17)), ((2, 5), (2, 3), (2, 1), 1, (19, 11))]:
            layer = reggan_ext.LocalRegression(3, 3, kernel, size, stride, 1, dilation, groups,
                                               device="cuda", dtype=dtype)
            x = torch.randn(3, 3, *size, device="cuda", dtype=dtype, requires_grad=True)
            layer(x).float().square().sum().backward()
    # Grids of the register-blocked kernels (at least SMs x 1024 threads): quad columns (width
    # 128) and scalar ones (130); 100 images through 3 channels split backward_weight's batch.
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    blocked_batch = 8 * -(-sms * 1024 // (16 * 128 * 32))
    for dtype in (torch.float32, torch.float16):
        for channels, width, batch in [(16, 128, blocked_batch), (16, 130, blocked_batch),
                                       (3, 128, 100)]:
            layer = reggan_ext.LocalRegression(channels, channels, 3, (128, width), padding=1,
                                               groups=channels, device="cuda", dtype=dtype)
            x = torch.randn(batch, channels, 128, width, device="cuda", dtype=dtype,
                            requires_grad=True)
            layer(x).float().square().sum().backward()
    # k = 3 (10 unknowns) takes the thread-per-system solve, k = 5 and 7 the warp-per-system one;
    # GCV adds the inverse-trace kernels.
    for dtype in (torch.float32, torch.float64):
        for kernel in (3, 5, 7):
            layer = reggan_ext.LocalRegression(3, 3, kernel, (13, 17), padding="same", groups=3,
                                               device="cuda")
            x = torch.rand(5, 3, 13, 17, device="cuda")
            fitter = reggan_ext.RidgeFitter(layer, dtype=dtype)
            fitter.update(x, x.flip(-1))
            fitter.solve(0.4)
            fitter.solve([0.1, 1.0], select="gcv")
    torch.cuda.synchronize()
    print("ok")


if __name__ == "__main__":
    main()
