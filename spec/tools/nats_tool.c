/* nats_tool.c - an independent NATS client for the interop specs: nats.c
 * only, none of osara's code, so a spec proves osara speaks the protocol
 * rather than agreeing with itself.
 *
 *   osara_nats_tool pub URL SUBJECT DATA     publish DATA with header trace=tool
 *   osara_nats_tool req URL SUBJECT DATA     request; prints the reply's data
 *   osara_nats_tool sub URL SUBJECT COUNT    prints "ready", then the data of
 *                                            COUNT messages, one per line
 * Exits 1 with a message on stderr on any error or after 10 s of waiting. */
#include <nats/nats.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void check(natsStatus s, const char *what)
{
    if (s != NATS_OK) {
        fprintf(stderr, "nats_tool: %s: %s\n", what, natsStatus_GetText(s));
        exit(1);
    }
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: osara_nats_tool pub|req|sub URL SUBJECT DATA|COUNT\n");
        return 2;
    }
    const char *mode = argv[1], *subject = argv[3], *arg = argv[4];
    natsConnection *nc;
    check(natsConnection_ConnectTo(&nc, argv[2]), "connect");
    if (strcmp(mode, "pub") == 0) {
        natsMsg *m;
        check(natsMsg_Create(&m, subject, NULL, arg, (int)strlen(arg)), "message");
        check(natsMsgHeader_Set(m, "trace", "tool"), "header");
        check(natsConnection_PublishMsg(nc, m), "publish");
        check(natsConnection_FlushTimeout(nc, 10000), "flush");
        natsMsg_Destroy(m);
    } else if (strcmp(mode, "req") == 0) {
        natsMsg *reply;
        check(natsConnection_RequestString(&reply, nc, subject, arg, 10000), "request");
        printf("%.*s\n", natsMsg_GetDataLength(reply), natsMsg_GetData(reply));
        natsMsg_Destroy(reply);
    } else if (strcmp(mode, "sub") == 0) {
        natsSubscription *sub;
        check(natsConnection_SubscribeSync(&sub, nc, subject), "subscribe");
        check(natsConnection_FlushTimeout(nc, 10000), "flush");
        printf("ready\n");
        fflush(stdout);
        for (int i = 0; i < atoi(arg); i++) {
            natsMsg *m;
            check(natsSubscription_NextMsg(&m, sub, 10000), "next message");
            printf("%.*s\n", natsMsg_GetDataLength(m), natsMsg_GetData(m));
            fflush(stdout);
            natsMsg_Destroy(m);
        }
        natsSubscription_Destroy(sub);
    } else {
        fprintf(stderr, "nats_tool: unknown mode %s\n", mode);
        return 2;
    }
    natsConnection_Destroy(nc);
    nats_Close();
    return 0;
}
