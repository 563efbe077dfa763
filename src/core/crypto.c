/*
 * Signing of opaque tokens (pagination cursors): HMAC-SHA256 from OpenSSL's libcrypto, a
 * constant-time comparison, unpadded base64url (RFC 4648 section 5), and the cursor token made
 * of them (qx_cursor_seal / qx_cursor_open); AES-256-GCM sealing, key objects that keep their
 * key schedule, and the sealed values of personal fields (qx_sealed_kind / qx_sealed_open).
 *
 * The decoder is strict: only the url-safe alphabet, no padding, no whitespace, and the unused
 * low bits of the last character must be zero, so every byte string has exactly one encoding and
 * an edited token cannot decode to the same bytes.
 */
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>
#include <openssl/rand.h>

#include "qx.h"

/*
 * OpenSSL's one-shot HMAC() looks the MAC and the digest up again on every call, most of its
 * cost for a short message. Here the HMAC algorithm is fetched once, and a context keyed with
 * the last key used is kept (a process signs its cursors with one key) and only reset for each
 * message, under a lock: a MAC of a cursor takes microseconds.
 */
static pthread_mutex_t mac_mu = PTHREAD_MUTEX_INITIALIZER;
static EVP_MAC *mac_alg;        /* HMAC, fetched once */
static EVP_MAC_CTX *mac_keyed;  /* HMAC-SHA256 initialised with mac_key */
static unsigned char *mac_key;
static size_t mac_keylen;

/* The context keyed with key, ready for a message, or NULL. Called with mac_mu held. */
static EVP_MAC_CTX *keyed(const void *key, size_t keylen)
{
    static const unsigned char empty[1] = { 0 };
    if (mac_alg == NULL && (mac_alg = EVP_MAC_fetch(NULL, "HMAC", NULL)) == NULL)
        return NULL;
    if (mac_keyed == NULL || keylen != mac_keylen ||
        (keylen > 0 && CRYPTO_memcmp(key, mac_key, keylen) != 0)) {
        char digest[] = "SHA256";
        OSSL_PARAM params[2];
        EVP_MAC_CTX *ctx = EVP_MAC_CTX_new(mac_alg);
        unsigned char *copy = malloc(keylen > 0 ? keylen : 1);
        params[0] = OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0);
        params[1] = OSSL_PARAM_construct_end();
        if (ctx == NULL || copy == NULL ||
            !EVP_MAC_init(ctx, keylen > 0 ? key : empty, keylen, params)) {
            EVP_MAC_CTX_free(ctx);
            free(copy);
            return NULL;
        }
        if (keylen > 0)
            memcpy(copy, key, keylen);
        if (mac_key != NULL)
            OPENSSL_cleanse(mac_key, mac_keylen);
        free(mac_key);
        EVP_MAC_CTX_free(mac_keyed);
        mac_keyed = ctx;
        mac_key = copy;
        mac_keylen = keylen;
        return ctx;
    }
    /* no key: the same key again, the state after it is restored */
    return EVP_MAC_init(mac_keyed, NULL, 0, NULL) ? mac_keyed : NULL;
}

qx_status qx_hmac_sha256(unsigned char out[QX_HMAC_SHA256_LEN], const void *key, size_t keylen,
                         const void *data, size_t len, qx_error *err)
{
    EVP_MAC_CTX *ctx;
    size_t outlen = 0;
    int ok;

    if (keylen > INT_MAX)
        return qx_error_set(err, QX_ERR_INVALID, "HMAC key is too long");
    pthread_mutex_lock(&mac_mu);
    ctx = keyed(key, keylen);
    ok = ctx != NULL && EVP_MAC_update(ctx, data, len) &&
         EVP_MAC_final(ctx, out, &outlen, QX_HMAC_SHA256_LEN) && outlen == QX_HMAC_SHA256_LEN;
    pthread_mutex_unlock(&mac_mu);
    if (!ok)
        return qx_error_set(err, QX_ERR_NOMEM, "HMAC-SHA256 failed");
    return QX_OK;
}

qx_status qx_sha256(unsigned char out[QX_SHA256_LEN], const void *data, size_t len, qx_error *err)
{
    unsigned int outlen = 0;
    if (!EVP_Digest(data, len, out, &outlen, EVP_sha256(), NULL) || outlen != QX_SHA256_LEN)
        return qx_error_set(err, QX_ERR_NOMEM, "SHA-256 failed");
    return QX_OK;
}

qx_status qx_random_bytes(unsigned char *out, size_t n, qx_error *err)
{
    if (n > INT_MAX || RAND_bytes(out, (int)n) != 1)
        return qx_error_set(err, QX_ERR_NOMEM, "no random bytes to be had");
    return QX_OK;
}

/* AES-256-GCM, fetched once: the implicit fetch of EVP_aes_256_gcm() looks it up on every init */
static pthread_once_t gcm_once = PTHREAD_ONCE_INIT;
static EVP_CIPHER *gcm_alg;

static void gcm_fetch(void)
{
    gcm_alg = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
}

static const EVP_CIPHER *gcm(void)
{
    pthread_once(&gcm_once, gcm_fetch);
    return gcm_alg;
}

qx_status qx_aead_seal(unsigned char *out, const unsigned char key[QX_AEAD_KEY_LEN],
                       const void *aad, size_t aadlen, const void *plain, size_t len,
                       qx_error *err)
{
    const EVP_CIPHER *alg = gcm();
    EVP_CIPHER_CTX *ctx = NULL;
    unsigned char *nonce = out, *body = out + QX_AEAD_NONCE_LEN, *tag = body + len;
    int n = 0, fin = 0, ok;

    if (len > INT_MAX - 64 || aadlen > INT_MAX)
        return qx_error_set(err, QX_ERR_INVALID, "value too long to seal");
    if (alg == NULL || (ctx = EVP_CIPHER_CTX_new()) == NULL)
        return qx_error_set(err, QX_ERR_NOMEM, "AES-256-GCM is not available");
    ok = RAND_bytes(nonce, QX_AEAD_NONCE_LEN) == 1 &&
         EVP_EncryptInit_ex2(ctx, alg, key, nonce, NULL) &&
         (aadlen == 0 || EVP_EncryptUpdate(ctx, NULL, &n, aad, (int)aadlen)) &&
         (len == 0 || EVP_EncryptUpdate(ctx, body, &n, plain, (int)len)) &&
         EVP_EncryptFinal_ex(ctx, body + (len == 0 ? 0 : n), &fin) &&
         EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, QX_AEAD_TAG_LEN, tag);
    EVP_CIPHER_CTX_free(ctx);
    if (!ok)
        return qx_error_set(err, QX_ERR_NOMEM, "AES-256-GCM sealing failed");
    return QX_OK;
}

/* Opens sealed under the key ctx holds; alg and key NULL: ctx is already keyed and only the
 * nonce is set, which keeps its key schedule. See qx_aead_open. */
static qx_status gcm_open(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *alg, const unsigned char *key,
                          unsigned char *out, size_t *outlen, const void *aad, size_t aadlen,
                          const void *sealed, size_t len, qx_error *err)
{
    const unsigned char *nonce = sealed, *body = nonce + QX_AEAD_NONCE_LEN;
    unsigned char tag[QX_AEAD_TAG_LEN];
    size_t blen;
    int n = 0, fin = 0, ok;

    *outlen = 0;
    if (len < QX_AEAD_OVERHEAD)
        return qx_error_set(err, QX_ERR_INVALID, "sealed value is too short");
    if (len > INT_MAX || aadlen > INT_MAX)
        return qx_error_set(err, QX_ERR_INVALID, "sealed value is too long");
    blen = len - QX_AEAD_OVERHEAD;
    memcpy(tag, body + blen, QX_AEAD_TAG_LEN); /* the ctrl takes a non-const pointer */
    ok = EVP_DecryptInit_ex2(ctx, alg, key, nonce, NULL) &&
         (aadlen == 0 || EVP_DecryptUpdate(ctx, NULL, &n, aad, (int)aadlen)) &&
         (blen == 0 || EVP_DecryptUpdate(ctx, out, &n, body, (int)blen)) &&
         EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, QX_AEAD_TAG_LEN, tag);
    if (ok && EVP_DecryptFinal_ex(ctx, out + (blen == 0 ? 0 : n), &fin) <= 0) {
        OPENSSL_cleanse(out, blen);
        return qx_error_set(err, QX_ERR_INVALID,
                            "sealed value does not open: wrong key, wrong context or altered");
    }
    if (!ok)
        return qx_error_set(err, QX_ERR_NOMEM, "AES-256-GCM opening failed");
    *outlen = blen;
    return QX_OK;
}

qx_status qx_aead_open(unsigned char *out, size_t *outlen,
                       const unsigned char key[QX_AEAD_KEY_LEN], const void *aad, size_t aadlen,
                       const void *sealed, size_t len, qx_error *err)
{
    const EVP_CIPHER *alg = gcm();
    EVP_CIPHER_CTX *ctx;
    qx_status s;
    *outlen = 0;
    if (alg == NULL || (ctx = EVP_CIPHER_CTX_new()) == NULL)
        return qx_error_set(err, QX_ERR_NOMEM, "AES-256-GCM is not available");
    s = gcm_open(ctx, alg, key, out, outlen, aad, aadlen, sealed, len, err);
    EVP_CIPHER_CTX_free(ctx);
    return s;
}

/* Most of opening a short value under a fresh context is the context's setup and the key
 * schedule (AES's round keys, GCM's hash key); a key object does them once. */
struct qx_aead_key {
    EVP_CIPHER_CTX *ctx; /* keyed for opening */
};

qx_aead_key *qx_aead_key_new(const unsigned char key[QX_AEAD_KEY_LEN], qx_error *err)
{
    const EVP_CIPHER *alg = gcm();
    qx_aead_key *k = malloc(sizeof *k);
    if (k == NULL) {
        qx_error_set(err, QX_ERR_NOMEM, "out of memory");
        return NULL;
    }
    k->ctx = alg != NULL ? EVP_CIPHER_CTX_new() : NULL;
    if (k->ctx == NULL || !EVP_DecryptInit_ex2(k->ctx, alg, key, NULL, NULL)) {
        EVP_CIPHER_CTX_free(k->ctx);
        free(k);
        qx_error_set(err, QX_ERR_NOMEM, "AES-256-GCM is not available");
        return NULL;
    }
    return k;
}

qx_status qx_aead_key_open(qx_aead_key *k, unsigned char *out, size_t *outlen, const void *aad,
                           size_t aadlen, const void *sealed, size_t len, qx_error *err)
{
    return gcm_open(k->ctx, NULL, NULL, out, outlen, aad, aadlen, sealed, len, err);
}

void qx_aead_key_free(qx_aead_key *k)
{
    if (k == NULL)
        return;
    EVP_CIPHER_CTX_free(k->ctx); /* cleanses the key schedule */
    free(k);
}

int qx_sealed_kind(const char *s, size_t n, const char *prefix, size_t plen, int check_subject)
{
    if (n < plen || memcmp(s, prefix, plen) != 0)
        return 0;
    if (n < plen + QX_SEALED_SUBJECT_LEN + 1 || s[plen + QX_SEALED_SUBJECT_LEN] != ':' ||
        (check_subject && !qx_uuid_valid(s + plen, QX_SEALED_SUBJECT_LEN)))
        return -1;
    return 1;
}

size_t qx_sealed_buf_len(size_t hlen, size_t idlen, size_t klen, size_t n)
{
    return hlen + idlen + 1 + klen + 2 * (n / 4 * 3 + 3);
}

qx_status qx_sealed_open(qx_aead_key *k, const char *head, size_t hlen, const char *id,
                         size_t idlen, const char *field, size_t klen, const char *text, size_t n,
                         size_t plen, unsigned char *buf, const unsigned char **plain,
                         size_t *plain_len, qx_error *err)
{
    size_t skip = plen + QX_SEALED_SUBJECT_LEN + 1, tlen = n - skip;
    size_t aadlen = hlen + idlen + 1 + klen, blen = n / 4 * 3 + 3;
    unsigned char *aad = buf, *bytes = buf + aadlen, *out = bytes + blen;
    memcpy(aad, head, hlen);
    memcpy(aad + hlen, id, idlen);
    aad[hlen + idlen] = '\n';
    memcpy(aad + hlen + idlen + 1, field, klen);
    if (qx_b64url_decode(bytes, &blen, text + skip, tlen, err) != QX_OK ||
        qx_aead_key_open(k, out, plain_len, aad, aadlen, bytes, blen, err) != QX_OK)
        return err->status;
    *plain = out;
    return QX_OK;
}

int qx_equal_consttime(const void *a, const void *b, size_t len)
{
    return CRYPTO_memcmp(a, b, len) == 0;
}

static const char B64URL[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

size_t qx_b64url_encoded_len(size_t n)
{
    return n / 3 * 4 + (n % 3 == 0 ? 0 : n % 3 + 1);
}

void qx_b64url_encode(char *out, const unsigned char *in, size_t n)
{
    size_t i = 0;
    for (; i + 3 <= n; i += 3) {
        unsigned long v = ((unsigned long)in[i] << 16) | ((unsigned long)in[i + 1] << 8) | in[i + 2];
        *out++ = B64URL[(v >> 18) & 63];
        *out++ = B64URL[(v >> 12) & 63];
        *out++ = B64URL[(v >> 6) & 63];
        *out++ = B64URL[v & 63];
    }
    if (n - i == 1) {
        unsigned long v = (unsigned long)in[i] << 16;
        *out++ = B64URL[(v >> 18) & 63];
        *out++ = B64URL[(v >> 12) & 63];
    } else if (n - i == 2) {
        unsigned long v = ((unsigned long)in[i] << 16) | ((unsigned long)in[i + 1] << 8);
        *out++ = B64URL[(v >> 18) & 63];
        *out++ = B64URL[(v >> 12) & 63];
        *out++ = B64URL[(v >> 6) & 63];
    }
    *out = '\0';
}

/* The value of each byte in the alphabet; 64 for a byte outside it. */
static const unsigned char B64URL_VALUE[256] = {
    64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64,
    64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64,
    64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 62, 64, 64,
    52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 64, 64, 64, 64, 64, 64,
    64,  0,  1,  2,  3,  4,  5,  6,  7,  8,  9, 10, 11, 12, 13, 14,
    15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 64, 64, 64, 64, 63,
    64, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40,
    41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 64, 64, 64, 64, 64,
    64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64,
    64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64,
    64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64,
    64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64,
    64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64,
    64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64,
    64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64,
    64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64, 64,
};

qx_status qx_b64url_decode(unsigned char *out, size_t *outlen, const char *in, size_t n,
                           qx_error *err)
{
    const unsigned char *p = (const unsigned char *)in;
    size_t i = 0, o = 0, rest = n % 4;
    unsigned a, b, c, d;

    *outlen = 0;
    if (rest == 1)
        return qx_error_set(err, QX_ERR_INVALID, "base64url text has an impossible length");
    for (; i + 4 <= n; i += 4) {
        a = B64URL_VALUE[p[i]];
        b = B64URL_VALUE[p[i + 1]];
        c = B64URL_VALUE[p[i + 2]];
        d = B64URL_VALUE[p[i + 3]];
        if ((a | b | c | d) & 64)
            goto outside;
        out[o++] = (unsigned char)(a << 2 | b >> 4);
        out[o++] = (unsigned char)((b & 15) << 4 | c >> 2);
        out[o++] = (unsigned char)((c & 3) << 6 | d);
    }
    if (rest > 0) {
        /* 2 characters: one byte, the second's low 4 bits unused; 3: two bytes, 2 bits unused */
        a = B64URL_VALUE[p[i]];
        b = B64URL_VALUE[p[i + 1]];
        c = rest == 3 ? B64URL_VALUE[p[i + 2]] : 0;
        if ((a | b | c) & 64)
            goto outside;
        if (rest == 2 ? (b & 15) != 0 : (c & 3) != 0)
            return qx_error_set(err, QX_ERR_INVALID, "base64url text is not in canonical form");
        out[o++] = (unsigned char)(a << 2 | b >> 4);
        if (rest == 3)
            out[o++] = (unsigned char)((b & 15) << 4 | c >> 2);
    }
    *outlen = o;
    return QX_OK;
outside:
    return qx_error_set(err, QX_ERR_INVALID, "base64url text has a character outside its alphabet");
}

/* ---- cursors ------------------------------------------------------------------------------ */

static size_t frame_len(const qx_cursor_value *v, int n)
{
    size_t len = 0;
    int i;
    for (i = 0; i < n; i++)
        len += v[i].ptr == NULL ? 1 : 5 + v[i].len;
    return len;
}

size_t qx_cursor_sealed_len(const qx_cursor_value *v, int n)
{
    return qx_b64url_encoded_len(frame_len(v, n)) + 1 +
           qx_b64url_encoded_len(QX_HMAC_SHA256_LEN);
}

/* The MAC of QX_CURSOR_DOMAIN context "\n" body: the message is put together in one buffer
 * (one update of the MAC costs more than copying it). */
static qx_status cursor_mac(unsigned char mac[QX_HMAC_SHA256_LEN], const void *key,
                            size_t keylen, const char *context, size_t contextlen,
                            const char *body, size_t bodylen, qx_error *err)
{
    static const char domain[] = QX_CURSOR_DOMAIN;
    char local[1024], *msg = local;
    size_t dlen = sizeof domain - 1, len = dlen + contextlen + 1 + bodylen;
    qx_status s;
    if (len > sizeof local && (msg = malloc(len)) == NULL)
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
    memcpy(msg, domain, dlen);
    memcpy(msg + dlen, context, contextlen);
    msg[dlen + contextlen] = '\n';
    memcpy(msg + dlen + contextlen + 1, body, bodylen);
    s = qx_hmac_sha256(mac, key, keylen, msg, len, err);
    if (msg != local)
        free(msg);
    return s;
}

qx_status qx_cursor_seal(char *out, const void *key, size_t keylen, const char *context,
                         size_t contextlen, const qx_cursor_value *v, int n, qx_error *err)
{
    size_t flen = frame_len(v, n), blen = qx_b64url_encoded_len(flen), o = 0;
    unsigned char local[512], *frame = local, mac[QX_HMAC_SHA256_LEN];
    qx_status s;
    int i;
    for (i = 0; i < n; i++)
        if (v[i].ptr != NULL && v[i].len > 0xffffffffu)
            return qx_error_set(err, QX_ERR_INVALID, "cursor value %d is too long", i + 1);
    if (flen > sizeof local && (frame = malloc(flen)) == NULL)
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
    for (i = 0; i < n; i++) {
        if (v[i].ptr == NULL) {
            frame[o++] = 0;
            continue;
        }
        frame[o++] = 1;
        frame[o++] = (unsigned char)(v[i].len >> 24);
        frame[o++] = (unsigned char)(v[i].len >> 16);
        frame[o++] = (unsigned char)(v[i].len >> 8);
        frame[o++] = (unsigned char)v[i].len;
        memcpy(frame + o, v[i].ptr, v[i].len);
        o += v[i].len;
    }
    qx_b64url_encode(out, frame, flen);
    if (frame != local)
        free(frame);
    s = cursor_mac(mac, key, keylen, context, contextlen, out, blen, err);
    if (s != QX_OK)
        return s;
    out[blen] = '.';
    qx_b64url_encode(out + blen + 1, mac, sizeof mac);
    return QX_OK;
}

qx_status qx_cursor_open(qx_cursor_value *v, int n, unsigned char *frame, const char *token,
                         size_t tokenlen, const void *const *keys, const size_t *keylens,
                         int nkeys, const char *context, size_t contextlen, qx_error *err)
{
    const char *dot;
    unsigned char given[QX_HMAC_SHA256_LEN + 3], mac[QX_HMAC_SHA256_LEN];
    size_t blen, glen = 0, flen = 0, o = 0;
    int i, ok = 0;
    qx_error ignored;

    if (tokenlen > QX_CURSOR_MAX)
        return qx_error_set(err, QX_ERR_INVALID, "too long");
    dot = memchr(token, '.', tokenlen);
    if (dot == NULL)
        return qx_error_set(err, QX_ERR_INVALID, "malformed");
    blen = (size_t)(dot - token);
    if (tokenlen - blen - 1 != qx_b64url_encoded_len(QX_HMAC_SHA256_LEN) ||
        qx_b64url_decode(given, &glen, dot + 1, tokenlen - blen - 1, &ignored) != QX_OK ||
        glen != QX_HMAC_SHA256_LEN)
        return qx_error_set(err, QX_ERR_INVALID, "malformed signature");
    for (i = 0; i < nkeys && !ok; i++) {
        qx_status s = cursor_mac(mac, keys[i], keylens[i], context, contextlen, token, blen, err);
        if (s != QX_OK)
            return s;
        ok = qx_equal_consttime(mac, given, sizeof mac);
    }
    if (!ok)
        return qx_error_set(err, QX_ERR_INVALID,
                            "signature does not match (edited, forged, or from another listing)");
    /* signed by us: the rest can only fail if the listing's shape changed meanwhile */
    if (qx_b64url_decode(frame, &flen, token, blen, &ignored) != QX_OK)
        return qx_error_set(err, QX_ERR_INVALID, "does not fit this listing");
    for (i = 0; i < n; i++) {
        size_t len;
        if (o >= flen || frame[o] > 1)
            break;
        if (frame[o++] == 0) {
            v[i].ptr = NULL;
            v[i].len = 0;
            continue;
        }
        if (flen - o < 4)
            break;
        len = ((size_t)frame[o] << 24) | ((size_t)frame[o + 1] << 16) |
              ((size_t)frame[o + 2] << 8) | frame[o + 3];
        o += 4;
        if (len > flen - o)
            break;
        v[i].ptr = (const char *)frame + o;
        v[i].len = len;
        o += len;
    }
    if (i < n || o != flen)
        return qx_error_set(err, QX_ERR_INVALID, "does not fit this listing");
    return QX_OK;
}
