/* The op format shared by Python (engine/lowering.py builds the tables) and C (the
 * inference plan in _infer.h, the training step in _train.h), declared once here.
 *
 * FL_OP_FIELDS lists every field of an op; each is an int64 (sizes, flags, and the
 * addresses of arrays Python keeps alive). The macro generates the C struct and the
 * list of names Python reads through _kernels.op_fields(), so a table row built in
 * Python by field name is the struct C reads: the two sides cannot drift.
 */
#ifndef FLATNET_OPS_H
#define FLATNET_OPS_H
#include <stdint.h>

#define FL_OP_FIELDS(X)                                                                      \
    X(kind)     /* FL_GEMM, FL_CONV, ... below */                                            \
    X(relu)     /* 1: ReLU applied to the op's output */                                     \
    X(c_in) X(h_in) X(w_in) X(c_out) X(h_out) X(w_out)  /* per-image shapes */               \
    X(k) X(stride) X(pad)                 /* CONV kernel, POOL window; stride; CONV padding */ \
    X(kv) X(vbefore) X(kh) X(hbefore) X(h_mid)  /* VH: taps, leading zero padding, rows of v */ \
    X(w) X(b) X(wv) X(bv) X(wh) X(bh)     /* parameters (addresses; layouts per op below) */ \
    X(dw) X(db) X(dwv) X(dbv) X(dwh) X(dbh)  /* training: their gradients */                  \
    X(out) X(mid) X(aux)                  /* training: output; CONV's packed weights; argmax/mask or CONV's columns; \
                                             inference: aux of a Winograd CONV, its GEMMs' zero bias */ \
    X(thresh) X(seed) X(scale)            /* training: dropout keep threshold, seed, float32 bits of 1/(1-p) */ \
    X(chunk)                              /* training: CONV images per im2col chunk */              \
    X(pooled)                             /* training: 1 on a CONV whose forward also runs the max-pooling \
                                             after it, image by image (its own output is not kept) */ \
    X(tile)                               /* CONV: Winograd output tile m (0: direct), lowering.conv_tile */ \
    X(wt) X(tv) X(tm)                     /* tile > 0: transforms AT|G|BT; training: transformed input, products */

typedef struct {
#define FL_FIELD_MEMBER(name) int64_t name;
    FL_OP_FIELDS(FL_FIELD_MEMBER)
#undef FL_FIELD_MEMBER
} fl_op;

static const char *const fl_op_field_names[] = {
#define FL_FIELD_NAME(name) #name,
    FL_OP_FIELDS(FL_FIELD_NAME)
#undef FL_FIELD_NAME
};
#define FL_NFIELDS ((int)(sizeof(fl_op) / sizeof(int64_t)))

static int fl_nfields(void) { return FL_NFIELDS; }
static const char *fl_field_name(int i) { return i >= 0 && i < FL_NFIELDS ? fl_op_field_names[i] : ""; }

/* Op kinds. Python reads their names through _kernels.op_kinds() (engine/lowering.py, CKIND), so a row
 * built there by kind name is the kind C switches on. */
#define FL_OP_KINDS(X) X(GEMM) X(CONV) X(VH) X(POOL) X(LINEAR) X(RELU) X(TO_NHWC) X(TO_NCHW) X(SOFTMAX) X(DROPOUT)
enum {
#define FL_KIND_ENUM(name) FL_##name,
    FL_OP_KINDS(FL_KIND_ENUM)
#undef FL_KIND_ENUM
    FL_NKINDS
};
static const char *const fl_kind_names[] = {
#define FL_KIND_NAME(name) #name,
    FL_OP_KINDS(FL_KIND_NAME)
#undef FL_KIND_NAME
};
static int fl_nkinds(void) { return FL_NKINDS; }
static const char *fl_kind_name(int i) { return i >= 0 && i < FL_NKINDS ? fl_kind_names[i] : ""; }

static inline const float *fl_cptr(int64_t v) { return (const float *)(intptr_t)v; }
static inline float *fl_ptr(int64_t v) { return (float *)(intptr_t)v; }

#endif
