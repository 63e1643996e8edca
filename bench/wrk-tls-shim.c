/*
 * LD_PRELOAD shim for wrk (bench/run.sh builds it into bench/out/).
 *
 * Why: wrk keeps one SSL object per connection slot and only SSL_clear()s it
 * on reconnect, so with "Connection: close" every reconnect offers the previous
 * session and the server *resumes* it (TLS 1.2 session ticket/id, TLS 1.3 PSK).
 * That would measure abbreviated handshakes, and whether resumption happens at
 * all would depend on each proxy's session-cache defaults.  This shim drops the
 * cached session before each new handshake so every connection does a full
 * handshake (certificate + ECDSA signature + ECDHE) against every proxy alike.
 *
 *   BENCH_TLS_RESUME=1   keep wrk's default behaviour (allow resumption)
 *   BENCH_TLS_MAX=1.2    cap the client at TLS 1.2 (default: 1.3 allowed)
 *
 * No OpenSSL headers needed: everything is looked up with dlsym() at run time
 * from the libssl that wrk itself loaded.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

typedef struct ssl_st SSL;
#define SSL_CTRL_SET_MAX_PROTO_VERSION 124
#define TLS1_2_VERSION 0x0303

static int (*real_connect)(SSL *);
static int (*p_in_before)(const SSL *);
static int (*p_set_session)(SSL *, void *);
static long (*p_ctrl)(SSL *, int, long, void *);
static int resume = -1, cap12;

int SSL_connect(SSL *s)
{
    if (resume < 0) {
        const char *r = getenv("BENCH_TLS_RESUME"), *m = getenv("BENCH_TLS_MAX");
        resume = r && strcmp(r, "1") == 0;
        cap12 = m && strcmp(m, "1.2") == 0;
        real_connect = (int (*)(SSL *))dlsym(RTLD_NEXT, "SSL_connect");
        p_in_before = (int (*)(const SSL *))dlsym(RTLD_DEFAULT, "SSL_in_before");
        p_set_session = (int (*)(SSL *, void *))dlsym(RTLD_DEFAULT, "SSL_set_session");
        p_ctrl = (long (*)(SSL *, int, long, void *))dlsym(RTLD_DEFAULT, "SSL_ctrl");
    }
    /* SSL_connect is called repeatedly on a non-blocking socket; only touch
     * the object before the first flight of a new handshake. */
    if (p_in_before && p_in_before(s)) {
        if (!resume && p_set_session)
            p_set_session(s, NULL);
        if (cap12 && p_ctrl)
            p_ctrl(s, SSL_CTRL_SET_MAX_PROTO_VERSION, TLS1_2_VERSION, NULL);
    }
    return real_connect(s);
}
