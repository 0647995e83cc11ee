/*
 * api.c - the public entry points of shmkey.h, each choosing a transport.
 * Callers (cffi with the GIL released, or an OpenSSL provider) see one API.
 */
#include "internal.h"

#include <stdlib.h>

/*
 * One request, one reply, within timeout_ms. On SHMKEY_OK, resp holds the
 * oracle's status and out holds resp->out_len bytes. Safe from any number of
 * threads; never calls back into Python.
 */
int shmkey_call(struct shmkey_client *c, const struct shmkey_req *req,
                const uint8_t *in, uint8_t *out, uint32_t out_cap,
                struct shmkey_resp *resp, uint32_t timeout_ms)
{
    if (!c || !req || !resp || (req->in_len && !in))
        return SHMKEY_EINVAL;
    uint64_t deadline = shmkey_now_ns() + (uint64_t)timeout_ms * 1000000u;
    if (c->transport == SHMKEY_TRANSPORT_SHM)
        return shmkey_shm_call(c, req, in, out, out_cap, resp, deadline);
    return shmkey_sock_call(c, req, in, out, out_cap, resp, deadline);
}

/* n pings timed one by one in C: the transport's cost without Python's. */
int shmkey_ping_loop(struct shmkey_client *c, uint32_t n, uint64_t *ns_out,
                     uint32_t timeout_ms)
{
    struct shmkey_req req = {.op = SHMKEY_OP_PING};
    struct shmkey_resp resp;
    uint8_t out[1];
    for (uint32_t i = 0; i < n; i++) {
        uint64_t t0 = shmkey_now_ns();
        int rc = shmkey_call(c, &req, NULL, out, 0, &resp, timeout_ms);
        if (rc == SHMKEY_OK)
            rc = resp.status;
        if (rc != SHMKEY_OK)
            return rc;
        if (ns_out)
            ns_out[i] = shmkey_now_ns() - t0;
    }
    return SHMKEY_OK;
}

void shmkey_client_close(struct shmkey_client *c)
{
    if (!c)
        return;
    if (c->transport == SHMKEY_TRANSPORT_SHM)
        shmkey_shm_client_close(c);
    else
        shmkey_sock_client_close(c);
}

uint32_t shmkey_client_max_payload(const struct shmkey_client *c)
{
    return c->max_payload;
}

int shmkey_client_transport(const struct shmkey_client *c)
{
    return c->transport;
}

int shmkey_server_next(struct shmkey_server *s, struct shmkey_work *w,
                       uint32_t timeout_ms)
{
    if (s->transport == SHMKEY_TRANSPORT_SHM)
        return shmkey_shm_server_next(s, w, timeout_ms);
    return shmkey_sock_server_next(s, w, timeout_ms);
}

int shmkey_server_reply(struct shmkey_server *s, struct shmkey_work *w,
                        int32_t status, const uint8_t *out, uint32_t out_len)
{
    if (out_len && !out)
        return SHMKEY_EINVAL;
    if (s->transport == SHMKEY_TRANSPORT_SHM)
        return shmkey_shm_server_reply(s, w, status, out, out_len);
    return shmkey_sock_server_reply(s, w, status, out, out_len);
}

/* Wake every waiter so it sees the ring stopping; workers return EUNAVAIL. */
void shmkey_server_stop(struct shmkey_server *s)
{
    s->stopping = 1;
    if (s->transport == SHMKEY_TRANSPORT_SHM)
        shmkey_shm_server_stop(s);
}

void shmkey_server_close(struct shmkey_server *s)
{
    if (!s)
        return;
    if (s->transport == SHMKEY_TRANSPORT_SHM)
        shmkey_shm_server_close(s);
    else
        shmkey_sock_server_close(s);
}

struct shmkey_work *shmkey_work_new(uint32_t cap)
{
    struct shmkey_work *w = calloc(1, sizeof(*w));
    if (!w)
        return NULL;
    w->payload = calloc(1, cap ? cap : 1);
    if (!w->payload) {
        free(w);
        return NULL;
    }
    w->cap = cap;
    w->fd = -1;
    return w;
}

void shmkey_work_free(struct shmkey_work *w)
{
    if (!w)
        return;
    free(w->payload);
    free(w);
}
