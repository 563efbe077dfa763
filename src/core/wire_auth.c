/*
 * The wire codec's authentication (see wire.c): the start-up's requests answered (trust,
 * cleartext password, md5, SCRAM-SHA-256 as RFC 5802 and RFC 7677 have it, without channel
 * binding), the hashes and proofs on libcrypto.
 *
 * SASLprep: a password in ASCII is its own SASLprep form; any other is used as its UTF-8 bytes,
 * which is what libpq does when SASLprep fails, and what the server does when it stores one.
 */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <openssl/sha.h>

#include "internal.h"
#include "wire_internal.h"

#define SCRAM_KEY_LEN 32   /* SHA-256 */
#define SCRAM_NONCE_RAW 18 /* 24 base64 characters, as libpq's */

/* ---- md5 --------------------------------------------------------------------------------- */

static int md5_hex(char out[33], const void *a, size_t alen, const void *b, size_t blen)
{
    static const char digits[] = "0123456789abcdef";
    unsigned char d[EVP_MAX_MD_SIZE];
    unsigned int dlen = 0, i;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int ok = ctx != NULL && EVP_DigestInit_ex(ctx, EVP_md5(), NULL) &&
             EVP_DigestUpdate(ctx, a, alen) && EVP_DigestUpdate(ctx, b, blen) &&
             EVP_DigestFinal_ex(ctx, d, &dlen) && dlen == 16;
    EVP_MD_CTX_free(ctx);
    if (!ok)
        return 0;
    for (i = 0; i < 16; i++) {
        out[i * 2] = digits[d[i] >> 4];
        out[i * 2 + 1] = digits[d[i] & 15];
    }
    out[32] = '\0';
    OPENSSL_cleanse(d, sizeof d);
    return 1;
}

int qx_md5_password(char out[36], const char *password, const char *user,
                    const unsigned char salt[4])
{
    char inner[33];
    int ok = md5_hex(inner, password, strlen(password), user, strlen(user)) &&
             md5_hex(out + 3, inner, 32, salt, 4);
    OPENSSL_cleanse(inner, sizeof inner);
    if (ok)
        memcpy(out, "md5", 3);
    return ok;
}

/* ---- SCRAM-SHA-256 ----------------------------------------------------------------------- */

struct qx_scram {
    char client_nonce[SCRAM_NONCE_RAW / 3 * 4 + 1];
    char *client_first_bare;  /* "n=,r=<client nonce>" */
    unsigned char server_signature[SCRAM_KEY_LEN];
    int stage;                /* 1: first sent; 2: final sent; 3: server verified */
};

void qx_scram_free(qx_scram *s)
{
    if (s == NULL)
        return;
    if (s->client_first_bare != NULL) {
        OPENSSL_cleanse(s->client_first_bare, strlen(s->client_first_bare));
        free(s->client_first_bare);
    }
    OPENSSL_cleanse(s, sizeof *s);
    free(s);
}

qx_status qx_scram_first(qx_scram **out, qx_buf *first, qx_error *err)
{
    unsigned char raw[SCRAM_NONCE_RAW];
    qx_scram *s = calloc(1, sizeof *s);
    size_t n;

    *out = NULL;
    if (s == NULL)
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
    if (RAND_bytes(raw, sizeof raw) != 1) {
        qx_scram_free(s);
        return qx_error_set(err, QX_ERR_CONNECTION, "SCRAM: no random bytes for the nonce");
    }
    EVP_EncodeBlock((unsigned char *)s->client_nonce, raw, sizeof raw);
    n = strlen(s->client_nonce) + 6;
    s->client_first_bare = malloc(n);
    if (s->client_first_bare == NULL) {
        qx_scram_free(s);
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
    }
    snprintf(s->client_first_bare, n, "n=,r=%s", s->client_nonce);
    /* no channel binding ("n"), no authorization identity; the user is the startup message's */
    qx_buf_append_str(first, "n,,");
    qx_buf_append_str(first, s->client_first_bare);
    s->stage = 1;
    *out = s;
    return QX_OK;
}

/* The value of attribute a ("a=value") at *p (text up to end); moves *p past it and its comma. */
static int attribute(const char **p, const char *end, char a, const char **val, size_t *len)
{
    const char *q = *p, *comma;
    if (end - q < 2 || q[0] != a || q[1] != '=')
        return 0;
    q += 2;
    comma = memchr(q, ',', (size_t)(end - q));
    *val = q;
    *len = (size_t)((comma != NULL ? comma : end) - q);
    *p = comma != NULL ? comma + 1 : end;
    return 1;
}

/* Strict base64 of len characters into out (room for len / 4 * 3): the decoded length, or -1. */
static int b64_decode(unsigned char *out, const char *in, size_t len)
{
    int n, pad = 0;
    if (len == 0 || len % 4 != 0 || len > INT_MAX)
        return -1;
    n = EVP_DecodeBlock(out, (const unsigned char *)in, (int)len);
    if (n < 0)
        return -1;
    if (in[len - 1] == '=')
        pad++;
    if (in[len - 2] == '=')
        pad++;
    return n - pad;
}

static int hmac(unsigned char out[SCRAM_KEY_LEN], const unsigned char *key, size_t keylen,
                const void *data, size_t len)
{
    unsigned int outlen = 0;
    return HMAC(EVP_sha256(), key, (int)keylen, data, len, out, &outlen) != NULL &&
           outlen == SCRAM_KEY_LEN;
}

qx_status qx_scram_continue(qx_scram *s, const char *password, const char *msg, size_t len,
                            qx_buf *final, qx_error *err)
{
    const char *p = msg, *end = msg + len, *nonce, *salt64, *iters;
    size_t nlen, slen, ilen, cnlen = strlen(s->client_nonce), i;
    unsigned char *salt = NULL, salted[SCRAM_KEY_LEN], client_key[SCRAM_KEY_LEN];
    unsigned char stored_key[SCRAM_KEY_LEN], signature[SCRAM_KEY_LEN], server_key[SCRAM_KEY_LEN];
    unsigned char proof[SCRAM_KEY_LEN];
    char proof64[SCRAM_KEY_LEN / 3 * 4 + 8], itext[16], *endp;
    long iterations;
    int saltlen, ok;
    qx_buf auth;
    qx_status st = QX_OK;

    if (s->stage != 1)
        return qx_error_set(err, QX_ERR_CONNECTION, "SCRAM: unexpected server-first-message");
    if (!attribute(&p, end, 'r', &nonce, &nlen) || !attribute(&p, end, 's', &salt64, &slen) ||
        !attribute(&p, end, 'i', &iters, &ilen))
        return qx_error_set(err, QX_ERR_CONNECTION, "SCRAM: malformed server-first-message");
    if (nlen <= cnlen || memcmp(nonce, s->client_nonce, cnlen) != 0 ||
        memchr(nonce, '\0', nlen) != NULL)
        return qx_error_set(err, QX_ERR_CONNECTION,
                            "SCRAM: the server's nonce does not extend the client's");
    if (ilen == 0 || ilen >= sizeof itext)
        return qx_error_set(err, QX_ERR_CONNECTION, "SCRAM: bad iteration count");
    memcpy(itext, iters, ilen);
    itext[ilen] = '\0';
    iterations = strtol(itext, &endp, 10);
    if (*endp != '\0' || iterations < 1 || iterations > INT_MAX)
        return qx_error_set(err, QX_ERR_CONNECTION, "SCRAM: bad iteration count");
    salt = malloc(slen / 4 * 3 + 3);
    if (salt == NULL)
        return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
    saltlen = b64_decode(salt, salt64, slen);
    if (saltlen <= 0) {
        free(salt);
        return qx_error_set(err, QX_ERR_CONNECTION, "SCRAM: bad salt");
    }

    /* AuthMessage = client-first-message-bare "," server-first-message "," the client's final
     * message without its proof */
    qx_buf_init(&auth, NULL, 0);
    qx_buf_append_str(&auth, s->client_first_bare);
    qx_buf_append(&auth, ",", 1);
    qx_buf_append(&auth, msg, len);
    qx_buf_append_str(&auth, ",c=biws,r="); /* biws: base64 of "n,," */
    qx_buf_append(&auth, nonce, nlen);

    ok = !auth.failed &&
         PKCS5_PBKDF2_HMAC(password, (int)strlen(password), salt, saltlen, (int)iterations,
                           EVP_sha256(), SCRAM_KEY_LEN, salted) == 1 &&
         hmac(client_key, salted, SCRAM_KEY_LEN, "Client Key", 10) &&
         SHA256(client_key, SCRAM_KEY_LEN, stored_key) != NULL &&
         hmac(signature, stored_key, SCRAM_KEY_LEN, auth.p, auth.len) &&
         hmac(server_key, salted, SCRAM_KEY_LEN, "Server Key", 10) &&
         hmac(s->server_signature, server_key, SCRAM_KEY_LEN, auth.p, auth.len);
    if (ok) {
        for (i = 0; i < SCRAM_KEY_LEN; i++)
            proof[i] = client_key[i] ^ signature[i];
        EVP_EncodeBlock((unsigned char *)proof64, proof, SCRAM_KEY_LEN);
        qx_buf_append_str(final, "c=biws,r=");
        qx_buf_append(final, nonce, nlen);
        qx_buf_append_str(final, ",p=");
        qx_buf_append_str(final, proof64);
        s->stage = 2;
    } else {
        st = qx_error_set(err, auth.failed ? QX_ERR_NOMEM : QX_ERR_CONNECTION,
                          "SCRAM: computing the proof failed");
    }
    OPENSSL_cleanse(salted, sizeof salted);
    OPENSSL_cleanse(client_key, sizeof client_key);
    OPENSSL_cleanse(stored_key, sizeof stored_key);
    OPENSSL_cleanse(signature, sizeof signature);
    OPENSSL_cleanse(server_key, sizeof server_key);
    OPENSSL_cleanse(proof, sizeof proof);
    OPENSSL_cleanse(proof64, sizeof proof64);
    if (auth.p != NULL)
        OPENSSL_cleanse(auth.p, auth.len);
    qx_buf_free(&auth);
    free(salt);
    return st;
}

qx_status qx_scram_final(qx_scram *s, const char *msg, size_t len, qx_error *err)
{
    const char *p = msg, *end = msg + len, *v;
    size_t vlen;
    unsigned char sig[SCRAM_KEY_LEN + 8];
    int n;

    if (s->stage != 2)
        return qx_error_set(err, QX_ERR_CONNECTION, "SCRAM: unexpected server-final-message");
    if (attribute(&p, end, 'e', &v, &vlen))
        return qx_error_set(err, QX_ERR_CONNECTION, "SCRAM: the server refused: %.*s",
                            (int)(vlen > 200 ? 200 : vlen), v);
    if (!attribute(&p, end, 'v', &v, &vlen) || vlen != 44)
        return qx_error_set(err, QX_ERR_CONNECTION, "SCRAM: malformed server-final-message");
    n = b64_decode(sig, v, vlen);
    if (n != SCRAM_KEY_LEN || CRYPTO_memcmp(sig, s->server_signature, SCRAM_KEY_LEN) != 0)
        return qx_error_set(err, QX_ERR_CONNECTION,
                            "SCRAM: the server's signature is wrong (it does not know the "
                            "password)");
    s->stage = 3;
    return QX_OK;
}

int qx_scram_verified(const qx_scram *s) { return s != NULL && s->stage == 3; }

/* ---- the start-up's authentication requests -------------------------------------------------- */

static qx_status need_password(qx_wire *w, qx_error *err)
{
    if (w->password != NULL)
        return QX_OK;
    return qx_error_set(err, QX_ERR_CONNECTION,
                        "the server asks for a password for user \"%s\" and none was given",
                        w->user);
}

static qx_status password_message(qx_wire *w, const char *text, size_t len)
{
    size_t at = begin_msg(&w->out, 'p');
    qx_buf_append(&w->out, text, len);
    end_msg(&w->out, at);
    w->out_secret = 1;
    return w->out.failed ? QX_ERR_NOMEM : QX_OK;
}

qx_status qx_wire_authenticate(qx_wire *w, const char *body, size_t len, qx_error *err)
{
    unsigned int code;
    qx_status s;
    if (len < 4)
        return qx_error_set(err, QX_ERR_CONNECTION, "protocol violation: short authentication");
    code = get_u32(body);
    body += 4, len -= 4;
    switch (code) {
    case 0: /* AuthenticationOk */
        if (w->scram != NULL && !qx_scram_verified(w->scram))
            return qx_error_set(err, QX_ERR_CONNECTION,
                                "SCRAM: the server ended the exchange without proving that it "
                                "knows the password");
        qx_scram_free(w->scram);
        w->scram = NULL;
        return QX_OK;
    case 3: /* cleartext */
        if ((s = need_password(w, err)) != QX_OK)
            return s;
        w->auth = "password";
        if (password_message(w, w->password, strlen(w->password) + 1) != QX_OK)
            return qx_error_set(err, QX_ERR_NOMEM, "out of memory");
        return QX_OK;
    case 5: { /* md5, with a 4-byte salt */
        char hashed[36];
        if (len != 4)
            return qx_error_set(err, QX_ERR_CONNECTION, "protocol violation: md5 salt");
        if ((s = need_password(w, err)) != QX_OK)
            return s;
        w->auth = "md5";
        if (!qx_md5_password(hashed, w->password, w->user, (const unsigned char *)body))
            return qx_error_set(err, QX_ERR_CONNECTION, "md5 is not available in libcrypto");
        s = password_message(w, hashed, sizeof hashed);
        OPENSSL_cleanse(hashed, sizeof hashed);
        return s == QX_OK ? QX_OK : qx_error_set(err, QX_ERR_NOMEM, "out of memory");
    }
    case 10: { /* SASL: a list of mechanisms */
        const char *p = body, *end = body + len;
        int found = 0;
        qx_buf first;
        size_t at;
        while (p < end && *p != '\0') {
            const char *z = memchr(p, '\0', (size_t)(end - p));
            if (z == NULL)
                return qx_error_set(err, QX_ERR_CONNECTION, "protocol violation: SASL list");
            found = found || strcmp(p, "SCRAM-SHA-256") == 0;
            p = z + 1;
        }
        if (!found)
            return qx_error_set(err, QX_ERR_CONNECTION,
                                "none of the server's SASL mechanisms is supported by qx's "
                                "protocol codec (SCRAM-SHA-256 without channel binding)");
        if ((s = need_password(w, err)) != QX_OK)
            return s;
        if (w->scram != NULL)
            return qx_error_set(err, QX_ERR_CONNECTION, "protocol violation: SASL twice");
        w->auth = "scram-sha-256";
        qx_buf_init(&first, NULL, 0);
        if ((s = qx_scram_first(&w->scram, &first, err)) != QX_OK) {
            qx_buf_free(&first);
            return s;
        }
        at = begin_msg(&w->out, 'p');
        put_cstr(&w->out, "SCRAM-SHA-256");
        put_i32(&w->out, (unsigned int)first.len);
        qx_buf_append(&w->out, first.p, first.len);
        end_msg(&w->out, at);
        qx_buf_free(&first);
        return w->out.failed ? qx_error_set(err, QX_ERR_NOMEM, "out of memory") : QX_OK;
    }
    case 11: { /* SASLContinue: the server-first-message */
        qx_buf final;
        if (w->scram == NULL)
            return qx_error_set(err, QX_ERR_CONNECTION, "protocol violation: SASL continue");
        qx_buf_init(&final, NULL, 0);
        s = qx_scram_continue(w->scram, w->password, body, len, &final, err);
        if (s == QX_OK && (final.failed || password_message(w, final.p, final.len) != QX_OK))
            s = qx_error_set(err, QX_ERR_NOMEM, "out of memory");
        if (final.p != NULL)
            OPENSSL_cleanse(final.p, final.len);
        qx_buf_free(&final);
        return s;
    }
    case 12: /* SASLFinal: the server's signature */
        if (w->scram == NULL)
            return qx_error_set(err, QX_ERR_CONNECTION, "protocol violation: SASL final");
        return qx_scram_final(w->scram, body, len, err);
    default:
        return qx_error_set(err, QX_ERR_CONNECTION,
                            "authentication method %u is not supported by qx's protocol codec "
                            "(trust, password, md5, scram-sha-256)", code);
    }
}
