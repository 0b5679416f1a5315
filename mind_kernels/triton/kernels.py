"""The @triton.jit kernels of the Triton routing backend (launched from ``routing.py``).

Importing this module imports triton, so ``routing.py`` imports it lazily:
``import mind_kernels`` must work where triton is missing, and
``TRITON_INTERPRET=1`` must be set before triton is first imported.

Layout: a persistent grid of P programs; program p serves users p, p + P,
p + 2P, ...  It loads S (D_out, D_in) once, and for each user its behaviours E
(L, D_in) once; every routing iteration then runs on-chip.  Tiles are padded to
powers of two (BL >= L, BK >= K, BDI >= D_in, BDO >= D_out) and the padding is
masked to zero on load, so any size works.

No ``tl.dot``: every contraction is a broadcast product reduced with
``tl.sum`` in float32.  That keeps float32 results IEEE-exact (``tl.dot`` in
float32 uses TF32 on tensor cores unless told otherwise, which breaks the
1e-5 / 1e-4 tolerance), lifts the 16-minimum on dot shapes (K is 4 here), and
runs in the interpreter.  The price is one (BK, max(BL, BDO), BDI) temporary,
which ``routing.shape_refusals`` bounds.

Reassociation (ROUTING.md allows it) avoids ever forming u = E S^T, an
(L, D_out, D_in) product per user:

    x_j = sum_i w_ij e_i            (BK, BDI)
    z_j = S x_j                     (BK, BDO)    = sum_i w_ij u_i
    v_j = S^T c_j                   (BK, BDI)
    b_ij += s * (e_i . v_j)         (BK, BL)     = s * (c_j . u_i), s = logit_scale

With ``USE_GRAM`` the iterations t < r go through Q = S^T S (D_in, D_in),
computed once per call by ``gram_kernel``, and never form z:

    y_j = Q x_j;  |z_j|^2 = x_j . y_j;  v_j = S^T c_j = a(|z_j|^2) y_j

K D_in^2 multiply-adds instead of 2 K D_in D_out per iteration (the same
formulation as the CPU kernel; 22% fewer FLOPs at L=50, D=64, K=4, r=3).

Jagged batches (``JAGGED``): E is values (N, D_IN) with offsets (B + 1) int64; user b's rows start at
offsets[b] and n_b of them are real.  The tile's rows past n_b are masked to zero on load (the zero
padding the padded op would see: no memory traffic for them), the validity mask is i < n_b, the
coupling w is stored as (N, K) rows and dE as (N, D_IN) rows.  Memory traffic follows N; the
arithmetic still runs on the (BK, BL) tile, BL = L_max rounded up to a power of two.

Half inputs are cast to float32 right after loading; all accumulation is in
float32 (no libdevice, no inline asm, no block pointers: interpreter-friendly).
"""

import triton
import triton.language as tl

SQUASH_EPS = 1e-9  # ROUTING.md: squash(z) = |z|^2 / (1 + |z|^2) * z / sqrt(|z|^2 + 1e-9)


@triton.jit
def _coupling(logits, valid_l, active_k, in_l, OVER_BEHAVIORS: tl.constexpr):
    """Coupling weights w (BK, BL) from logits b (BK, BL).

    valid_l: real, unmasked behaviours; active_k: active interests (j < K too);
    in_l: i < L (tile padding excluded, masked positions included).
    """
    if OVER_BEHAVIORS:
        # Softmax over all L positions per interest: masked positions stay in the denominator.
        b = tl.where(in_l[None, :], logits, float("-inf"))
        peak = tl.max(b, axis=1)
        e = tl.exp(b - peak[:, None])
        total = tl.sum(e, axis=1)
        w = e / total[:, None]
    else:
        # Softmax over the active interests per position; no active interest -> all -inf -> w = 0.
        b = tl.where(active_k[:, None], logits, float("-inf"))
        peak = tl.max(b, axis=0)
        peak = tl.where(peak == float("-inf"), 0.0, peak)  # avoid -inf - (-inf) = NaN
        e = tl.exp(b - peak[None, :])
        total = tl.sum(e, axis=0)
        w = e / tl.where(total == 0, 1.0, total)[None, :]  # a NaN total (NaN/+Inf logit) propagates
    keep = valid_l[None, :] & active_k[:, None]
    return tl.where(keep, w, 0.0)


@triton.jit
def _aggregate(w, E, S):
    """z_j = S (sum_i w_ij e_i): w (BK, BL), E (BL, BDI), S (BDO, BDI) -> (x (BK, BDI), z (BK, BDO))."""
    x = tl.sum(w[:, :, None] * E[None, :, :], axis=1)
    z = tl.sum(S[None, :, :] * x[:, None, :], axis=2)
    return x, z


@triton.jit
def _squash(z, EPS: tl.constexpr):
    """squash over the last axis of z (BK, BDO); 0 maps to 0."""
    n2 = tl.sum(z * z, axis=1)
    a = n2 / ((1.0 + n2) * tl.sqrt(n2 + EPS))
    return a[:, None] * z


@triton.jit
def gram_kernel(S_ptr, Q_ptr, D_IN, D_OUT, ROWS: tl.constexpr, BDI: tl.constexpr):
    """Q = S^T S (D_IN, D_IN) fp32 from S (D_OUT, D_IN); program p writes rows p*ROWS .. p*ROWS + ROWS - 1.

    A sum of D_OUT outer products of S's rows, accumulated in float32 in a fixed order.
    """
    pid = tl.program_id(0)
    offs_r = pid * ROWS + tl.arange(0, ROWS)
    offs_i = tl.arange(0, BDI)
    in_r = offs_r < D_IN
    in_i = offs_i < D_IN
    q = tl.zeros((ROWS, BDI), dtype=tl.float32)
    for o in range(D_OUT):
        row = tl.load(S_ptr + o * D_IN + offs_i, mask=in_i, other=0.0).to(tl.float32)
        part = tl.load(S_ptr + o * D_IN + offs_r, mask=in_r, other=0.0).to(tl.float32)
        q += part[:, None] * row[None, :]
    tl.store(Q_ptr + offs_r[:, None] * D_IN + offs_i[None, :], q, mask=in_r[:, None] & in_i[None, :])


@triton.jit
def routing_fwd_kernel(
    E_ptr, OFF_ptr, S_ptr, Q_ptr, B0_ptr, M_ptr, IM_ptr,  # inputs (OFF_ptr: jagged offsets, unused unless JAGGED)
    C_ptr, W_ptr, Z_ptr,  # outputs: capsules (E's dtype), coupling w (fp32), preactivation z (fp32)
    B, L, K, D_IN, D_OUT, b0_stride_b, num_iters, logit_scale,
    HAS_MASK: tl.constexpr, HAS_IMASK: tl.constexpr, OVER_BEHAVIORS: tl.constexpr, USE_GRAM: tl.constexpr,
    BL: tl.constexpr, BK: tl.constexpr, BDI: tl.constexpr, BDO: tl.constexpr,
    EPS: tl.constexpr, JAGGED: tl.constexpr = False,
):
    """Forward routing for users pid, pid + P, ...; all tensors contiguous.

    JAGGED: E is values (N, D_IN) with offsets (B + 1) at OFF_ptr, L is L_max, no M_ptr, and w is (N, K).

    E (B, L, D_IN); S (D_OUT, D_IN); Q = S^T S (D_IN, D_IN) fp32 when USE_GRAM;
    b0 (B or 1, K, L) fp32 with batch stride ``b0_stride_b`` (0 = broadcast);
    masks (B, L) / (B, K) uint8 when present; ``logit_scale`` s (fp32) scales the logit update.
    Writes c (B, K, D_OUT), w (B, K, L) and z (B, K, D_OUT) of the final round.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_l = tl.arange(0, BL)
    offs_k = tl.arange(0, BK)
    offs_i = tl.arange(0, BDI)
    offs_o = tl.arange(0, BDO)
    in_l = offs_l < L
    in_k = offs_k < K
    in_i = offs_i < D_IN
    in_o = offs_o < D_OUT
    tile_e = in_l[:, None] & in_i[None, :]
    tile_kl = in_k[:, None] & in_l[None, :]
    tile_ko = in_k[:, None] & in_o[None, :]

    # S once per program (it is shared by every user); padding rows/columns are 0.
    S = tl.load(S_ptr + offs_o[:, None] * D_IN + offs_i[None, :], mask=in_o[:, None] & in_i[None, :], other=0.0)
    S = S.to(tl.float32)

    for b in range(pid, B, nprog):
        b64 = tl.cast(b, tl.int64)  # B * L * D_IN may pass 2^31
        if JAGGED:
            row0 = tl.load(OFF_ptr + b64)
            valid_l = offs_l < (tl.load(OFF_ptr + b64 + 1) - row0)  # n_b <= L (validated)
            E = tl.load(E_ptr + (row0 + offs_l[:, None]) * D_IN + offs_i[None, :],
                        mask=valid_l[:, None] & in_i[None, :], other=0.0)
        else:
            E = tl.load(E_ptr + b64 * L * D_IN + offs_l[:, None] * D_IN + offs_i[None, :], mask=tile_e, other=0.0)
            if HAS_MASK:
                valid_l = (tl.load(M_ptr + b64 * L + offs_l, mask=in_l, other=0) != 0) & in_l
            else:
                valid_l = in_l
        E = E.to(tl.float32)
        if HAS_IMASK:
            active_k = (tl.load(IM_ptr + b64 * K + offs_k, mask=in_k, other=0) != 0) & in_k
        else:
            active_k = in_k
        if not OVER_BEHAVIORS:
            # Masked positions take no part in "interests" mode: zero them so that a NaN/Inf in padding
            # cannot leak through 0 * NaN (the reference's non-finite contract).
            E = tl.where(valid_l[:, None], E, 0.0)
        logits = tl.load(B0_ptr + b64 * b0_stride_b + offs_k[:, None] * L + offs_l[None, :], mask=tile_kl, other=0.0)
        logits = logits.to(tl.float32)

        for _t in range(num_iters - 1):
            w = _coupling(logits, valid_l, active_k, in_l, OVER_BEHAVIORS)
            if USE_GRAM:
                # Q is read from L1/L2 (shared by every program) rather than held next to S and E in registers.
                Q = tl.load(Q_ptr + offs_i[:, None] * D_IN + offs_i[None, :], mask=in_i[:, None] & in_i[None, :],
                            other=0.0)
                x = tl.sum(w[:, :, None] * E[None, :, :], axis=1)  # (BK, BDI)
                y = tl.sum(x[:, None, :] * Q[None, :, :], axis=2)  # Q x_j  (BK, BDI)
                n2 = tl.sum(x * y, axis=1)  # |S x_j|^2
                n2 = tl.where(n2 < 0.0, 0.0, n2)  # rounding of a positive semi-definite form; NaN stays NaN
                v = (n2 / ((1.0 + n2) * tl.sqrt(n2 + EPS)))[:, None] * y  # S^T c_j  (BK, BDI)
            else:
                x, z = _aggregate(w, E, S)
                c = _squash(z, EPS)
                v = tl.sum(c[:, :, None] * S[None, :, :], axis=1)  # S^T c_j  (BK, BDI)
            # b_ij += s * (e_i . S^T c_j), both paths; s = 1 keeps the unscaled bits (1 * x == x, fma(1, x, b)
            # rounds like b + x).
            logits += logit_scale * tl.sum(v[:, None, :] * E[None, :, :], axis=2)

        w = _coupling(logits, valid_l, active_k, in_l, OVER_BEHAVIORS)
        x, z = _aggregate(w, E, S)
        c = _squash(z, EPS)

        out_ko = b64 * K * D_OUT + offs_k[:, None] * D_OUT + offs_o[None, :]
        tl.store(C_ptr + out_ko, c.to(C_ptr.dtype.element_ty), mask=tile_ko)
        tl.store(Z_ptr + out_ko, z, mask=tile_ko)
        if JAGGED:
            tl.store(W_ptr + (row0 + offs_l[None, :]) * K + offs_k[:, None], w, mask=in_k[:, None] & valid_l[None, :])
        else:
            tl.store(W_ptr + b64 * K * L + offs_k[:, None] * L + offs_l[None, :], w, mask=tile_kl)


@triton.jit
def routing_bwd_kernel(
    G_ptr, E_ptr, OFF_ptr, S_ptr, W_ptr, Z_ptr,  # inputs: dL/dc, E, (jagged offsets), S, saved w and z
    DE_ptr, DSP_ptr,  # outputs: dE (E's dtype), dS partials (P, D_OUT, D_IN) fp32
    B, L, K, D_IN, D_OUT,
    BL: tl.constexpr, BK: tl.constexpr, BDI: tl.constexpr, BDO: tl.constexpr,
    EPS: tl.constexpr, JAGGED: tl.constexpr = False,
):
    """Backward of the detached routing for users pid, pid + P, ...:

        dz_j = a(n2) G_j + 2 a'(n2) (z_j . G_j) z_j
        dE_i = S^T du_i = sum_j w_ij (S^T dz_j)          (du never formed)
        dS  += sum_i du_i e_i^T = sum_j dz_j x_j^T       with x_j = sum_i w_ij e_i

    Program p writes its own dS partial (no atomics), summed in fixed order by
    the launcher, so the result is deterministic.  JAGGED: E and dE are (N, D_IN) rows, w is (N, K).
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_l = tl.arange(0, BL)
    offs_k = tl.arange(0, BK)
    offs_i = tl.arange(0, BDI)
    offs_o = tl.arange(0, BDO)
    in_l = offs_l < L
    in_k = offs_k < K
    in_i = offs_i < D_IN
    in_o = offs_o < D_OUT
    tile_e = in_l[:, None] & in_i[None, :]
    tile_kl = in_k[:, None] & in_l[None, :]
    tile_ko = in_k[:, None] & in_o[None, :]
    tile_s = in_o[:, None] & in_i[None, :]

    S = tl.load(S_ptr + offs_o[:, None] * D_IN + offs_i[None, :], mask=tile_s, other=0.0).to(tl.float32)
    dS = tl.zeros((BDO, BDI), dtype=tl.float32)

    for b in range(pid, B, nprog):
        b64 = tl.cast(b, tl.int64)
        if JAGGED:
            row0 = tl.load(OFF_ptr + b64)
            real_l = offs_l < (tl.load(OFF_ptr + b64 + 1) - row0)
            e_off = (row0 + offs_l[:, None]) * D_IN + offs_i[None, :]
            e_tile = real_l[:, None] & in_i[None, :]
            w = tl.load(W_ptr + (row0 + offs_l[None, :]) * K + offs_k[:, None], mask=in_k[:, None] & real_l[None, :],
                        other=0.0)
        else:
            e_off = b64 * L * D_IN + offs_l[:, None] * D_IN + offs_i[None, :]
            e_tile = tile_e
            w = tl.load(W_ptr + b64 * K * L + offs_k[:, None] * L + offs_l[None, :], mask=tile_kl, other=0.0)
        E = tl.load(E_ptr + e_off, mask=e_tile, other=0.0).to(tl.float32)
        ko = b64 * K * D_OUT + offs_k[:, None] * D_OUT + offs_o[None, :]
        G = tl.load(G_ptr + ko, mask=tile_ko, other=0.0).to(tl.float32)
        z = tl.load(Z_ptr + ko, mask=tile_ko, other=0.0)

        n2 = tl.sum(z * z, axis=1)
        s = tl.sqrt(n2 + EPS)
        one_n2 = 1.0 + n2
        a = n2 / (one_n2 * s)
        da = 1.0 / (one_n2 * one_n2 * s) - n2 / (2.0 * one_n2 * s * s * s)
        zg = tl.sum(z * G, axis=1)
        dz = a[:, None] * G + (2.0 * da * zg)[:, None] * z  # (BK, BDO)

        g = tl.sum(dz[:, :, None] * S[None, :, :], axis=1)  # S^T dz_j  (BK, BDI)
        dE = tl.sum(w[:, :, None] * g[:, None, :], axis=0)  # (BL, BDI); masked rows have w = 0
        tl.store(DE_ptr + e_off, dE.to(DE_ptr.dtype.element_ty), mask=e_tile)

        # Rows no interest draws on (masked ones) contribute exactly 0; zeroing them keeps NaN/Inf padding
        # out of dS (0 * NaN), as the forward did.
        used = tl.max(tl.abs(w), axis=0) > 0
        E = tl.where(used[:, None], E, 0.0)
        x = tl.sum(w[:, :, None] * E[None, :, :], axis=1)  # (BK, BDI)
        dS += tl.sum(dz[:, :, None] * x[:, None, :], axis=0)  # (BDO, BDI)

    tl.store(DSP_ptr + tl.cast(pid, tl.int64) * D_OUT * D_IN + offs_o[:, None] * D_IN + offs_i[None, :], dS, mask=tile_s)
