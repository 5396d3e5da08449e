/* The compiled training step (engine/_train.h) run from a file, without Python: tests/test_c_kernels.py builds
 * it for aarch64 (the generic vector path, NEON) and runs it under user-mode emulation on a step that
 * engine.trainstep.CompiledStep built on this machine, then compares the results with the layer path.
 *
 *     c_step_runner STEP_IN STEP_OUT
 *
 * STEP_IN (little-endian int64 words unless said): magic, R (memory regions), n_ops, n_fields, n (images),
 * threads; R region sizes in bytes; the regions' bytes, each padded to 8; n_fields flags (1: the field is
 * an address); the op table (n_ops x n_fields); the context (STEP_CTX words below). An address is
 * ((region + 1) << 40) | offset, or 0 for none. The runner allocates the regions, turns the addresses
 * into pointers, runs ft_forward and ft_backward, and writes every region back to STEP_OUT, in order.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "_infer.h"
#include "_train.h"

#define STEP_MAGIC 0x31504554534C46LL /* "FLSTEP1" */
#define STEP_CTX 16 /* cols, cols_floats, wbuf, wpack, bpad, bpad_floats, part, part_floats, scratch,
                       scratch_floats, g0, g1, wpart, wpart_floats, x, dlogits */

static int64_t n_regions;
static char **region;
static int64_t *size;

static void *address(int64_t v) {
    if (!v) return NULL;
    int64_t r = (v >> 40) - 1, off = v & ((1LL << 40) - 1);
    if (r < 0 || r >= n_regions || off >= size[r]) {
        fprintf(stderr, "an address outside the regions: %lld\n", (long long)v);
        exit(2);
    }
    return region[r] + off;
}

static void read_all(FILE *f, void *p, size_t n) {
    if (fread(p, 1, n, f) != n) {
        fprintf(stderr, "truncated input\n");
        exit(2);
    }
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: c_step_runner STEP_IN STEP_OUT\n");
        return 2;
    }
    FILE *f = fopen(argv[1], "rb");
    if (!f) return 2;
    int64_t h[6];
    read_all(f, h, sizeof h);
    if (h[0] != STEP_MAGIC || h[1] < 1 || h[1] > 100000 || h[2] < 1 || h[2] > 10000 || h[3] < 1 || h[3] > 1000) {
        fprintf(stderr, "not a step file\n");
        return 2;
    }
    n_regions = h[1];
    int64_t nops = h[2], nf = h[3], n = h[4];
    size = malloc(sizeof(int64_t) * n_regions);
    region = malloc(sizeof(char *) * n_regions);
    read_all(f, size, sizeof(int64_t) * n_regions);
    for (int64_t r = 0; r < n_regions; r++) {
        region[r] = aligned_alloc(64, (size[r] + 63) / 64 * 64);
        read_all(f, region[r], size[r]);
        if (size[r] % 8) {
            char pad[8];
            read_all(f, pad, 8 - size[r] % 8);
        }
    }
    int64_t *is_address = malloc(sizeof(int64_t) * nf), *table = malloc(sizeof(int64_t) * nops * nf);
    int64_t ctx[STEP_CTX];
    read_all(f, is_address, sizeof(int64_t) * nf);
    read_all(f, table, sizeof(int64_t) * nops * nf);
    read_all(f, ctx, sizeof ctx);
    fclose(f);
    if (nf * (int64_t)sizeof(int64_t) != (int64_t)sizeof(fl_op)) {
        fprintf(stderr, "the table has %lld fields, fl_op %d\n", (long long)nf, (int)(sizeof(fl_op) / 8));
        return 2;
    }
    for (int64_t i = 0; i < nops * nf; i++)
        if (is_address[i % nf]) table[i] = (int64_t)(intptr_t)address(table[i]);
    ft_ctx c = {0};
    c.threads = (int)h[5];
    c.team = 1;
    c.cols = address(ctx[0]);
    c.cols_floats = ctx[1];
    c.wbuf = address(ctx[2]);
    c.wpack = address(ctx[3]);
    c.bpad = address(ctx[4]);
    c.bpad_floats = ctx[5];
    c.part = address(ctx[6]);
    c.part_floats = ctx[7];
    c.scratch = address(ctx[8]);
    c.scratch_floats = ctx[9];
    c.g0 = address(ctx[10]);
    c.g1 = address(ctx[11]);
    c.wpart = address(ctx[12]);
    c.wpart_floats = ctx[13];
    c.times = NULL;
    const float *x = address(ctx[14]), *dlogits = address(ctx[15]);
    ft_forward((const fl_op *)table, (int)nops, x, n, &c);
    ft_backward((const fl_op *)table, (int)nops, x, dlogits, n, &c, (int)nops, 0);
    FILE *o = fopen(argv[2], "wb");
    if (!o) return 2;
    for (int64_t r = 0; r < n_regions; r++)
        if (fwrite(region[r], 1, size[r], o) != (size_t)size[r]) return 2;
    fclose(o);
    printf("VL=%d ok\n", FP_VL);
    return 0;
}
