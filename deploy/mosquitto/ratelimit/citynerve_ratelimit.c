/*
 * citynerve_ratelimit: a per-client publish rate limit for mosquitto 2.0 (plugin API version 5).
 *
 * Why: mosquitto acknowledges a gateway's QoS 1 PUBLISH at once and queues it for the collectors' session in
 * arrival order (one queue per subscriber, up to max_queued_messages). A stolen gateway that publishes faster
 * than the collectors read fills that queue, and every other gateway's messages wait behind its flood there,
 * before any collector can apply its per-gateway fairness (docs/benchmarks.md "Flood"). mosquitto 2.0.11 has
 * no per-client rate setting, so this plugin gives each client two token buckets, messages and payload bytes,
 * and refuses a PUBLISH over them at the door: MQTT 5 QoS 1 publishers get PUBACK 0x87 (not authorized), MQTT
 * 3.1.1 publishers an ordinary PUBACK, and the message is never queued. A citynerve agent keeps an unacknowledged
 * message in its outbox and sends it again; nothing is lost, the flooding gateway delays only itself.
 *
 * How: an ACL check (MOSQ_EVT_ACL_CHECK) for MOSQ_ACL_WRITE, i.e. once per PUBLISH received. Within its rate a
 * client's publish is left to the next check (MOSQ_ERR_PLUGIN_DEFER: the acl_file still decides what it may
 * write); over it, MOSQ_ERR_ACL_DENIED. Clients whose username starts with an exempt prefix (the collectors,
 * which publish every gateway's acknowledgements) are not limited. A client's state is dropped when it
 * disconnects, so memory follows the connected clients.
 *
 * Options (mosquitto.conf, after the "plugin" line):
 *   plugin_opt_messages_per_second  sustained messages per second per client   (default 200)
 *   plugin_opt_messages_burst       bucket size                                 (default 2000)
 *   plugin_opt_bytes_per_second     sustained payload bytes per second          (default 4194304)
 *   plugin_opt_bytes_burst          bucket size in bytes                        (default 67108864)
 *   plugin_opt_exempt_prefix        usernames not limited                       (default "collector")
 *   plugin_opt_listen_backlog       pending connections each listener may hold  (default: mosquitto's 100)
 *
 * The listen backlog: mosquitto 2.0.11 calls listen(sock, 100) (src/net.c) and has no setting for it. When a
 * broker restarts with thousands of gateways connected, they all come back within seconds; beyond 100 pending
 * connections the kernel drops the handshake's last ACK (or the SYN), the gateway's TCP stack retransmits after
 * 1, 3, 7 ... s and its connect timeout runs out: reconnection in waves (issue 14: 51 s for 10,000 gateways).
 * Linux lets listen() be called again on a listening socket to change its backlog (net/ipv4/af_inet.c
 * inet_listen), capped by net.core.somaxconn. Plugins are loaded before mosquitto opens its listeners, so this is
 * done at the first MOSQ_EVT_TICK (the main loop's first turn): every socket of the process in the listening
 * state (SO_ACCEPTCONN) gets listen(fd, listen_backlog). Logged once with how many listeners were changed.
 *
 * Build: make -C deploy/mosquitto/ratelimit (needs gcc and Debian's mosquitto-dev); tested against
 * mosquitto 2.0.11 by tests/test_broker_ratelimit.py. Written for citynerve; no code from other projects.
 */

#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/socket.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>

#define BUCKETS 4096

struct client_state {
	char *id;
	double msg_tokens;
	double byte_tokens;
	double stamp;
	double warned_at;
	uint64_t refused;
	struct client_state *next;
};

static mosquitto_plugin_id_t *plugin_id;
static struct client_state *table[BUCKETS];
static double msg_rate = 200.0, msg_burst = 2000.0;
static double byte_rate = 4194304.0, byte_burst = 67108864.0;
static char *exempt_prefix;
static int listen_backlog; /* 0: leave mosquitto's */
static int backlog_done;

static double now_seconds(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint32_t hash(const char *s)
{
	uint32_t h = 2166136261u; /* FNV-1a */
	while(*s){
		h ^= (uint8_t)*s++;
		h *= 16777619u;
	}
	return h % BUCKETS;
}

static struct client_state *find(const char *id, int create)
{
	uint32_t h = hash(id);
	struct client_state *c;
	for(c = table[h]; c; c = c->next){
		if(!strcmp(c->id, id)) return c;
	}
	if(!create) return NULL;
	c = calloc(1, sizeof(*c));
	if(!c) return NULL;
	c->id = strdup(id);
	if(!c->id){
		free(c);
		return NULL;
	}
	c->msg_tokens = msg_burst;
	c->byte_tokens = byte_burst;
	c->stamp = now_seconds();
	c->warned_at = -1e9;
	c->next = table[h];
	table[h] = c;
	return c;
}

static void forget(const char *id)
{
	uint32_t h = hash(id);
	struct client_state **p = &table[h];
	while(*p){
		if(!strcmp((*p)->id, id)){
			struct client_state *gone = *p;
			*p = gone->next;
			free(gone->id);
			free(gone);
			return;
		}
		p = &(*p)->next;
	}
}

static int exempt(const struct mosquitto *client)
{
	const char *username = mosquitto_client_username(client);
	return exempt_prefix && exempt_prefix[0] && username
		&& !strncmp(username, exempt_prefix, strlen(exempt_prefix));
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_acl_check *ed = event_data;
	const char *id;
	struct client_state *c;
	double now, size;
	(void)event;
	(void)userdata;

	if(ed->access != MOSQ_ACL_WRITE || exempt(ed->client)) return MOSQ_ERR_PLUGIN_DEFER;
	id = mosquitto_client_id(ed->client);
	if(!id) return MOSQ_ERR_PLUGIN_DEFER;
	c = find(id, 1);
	if(!c) return MOSQ_ERR_PLUGIN_DEFER; /* out of memory: the limit fails open, the ACL still applies */
	now = now_seconds();
	if(now > c->stamp){
		c->msg_tokens += (now - c->stamp) * msg_rate;
		if(c->msg_tokens > msg_burst) c->msg_tokens = msg_burst;
		c->byte_tokens += (now - c->stamp) * byte_rate;
		if(c->byte_tokens > byte_burst) c->byte_tokens = byte_burst;
		c->stamp = now;
	}
	size = (double)ed->payloadlen;
	/* A message larger than the byte burst passes only with a full bucket (and empties it for as long as it
	 * is over the rate), as collector/admission.py does: the same rule on both sides. */
	if(c->msg_tokens < 1.0 || (c->byte_tokens < size && c->byte_tokens < byte_burst)){
		c->refused++;
		if(now - c->warned_at >= 60.0){
			mosquitto_log_printf(MOSQ_LOG_WARNING,
					"citynerve_ratelimit: refused PUBLISH from %s over its rate (%.0f msg/s, %.0f B/s): %llu so far",
					id, msg_rate, byte_rate, (unsigned long long)c->refused);
			c->warned_at = now;
		}
		return MOSQ_ERR_ACL_DENIED;
	}
	c->msg_tokens -= 1.0;
	c->byte_tokens -= size;
	return MOSQ_ERR_PLUGIN_DEFER;
}

static int on_disconnect(int event, void *event_data, void *userdata)
{
	struct mosquitto_evt_disconnect *ed = event_data;
	const char *id = mosquitto_client_id(ed->client);
	(void)event;
	(void)userdata;
	if(id) forget(id);
	return MOSQ_ERR_SUCCESS;
}

/* listen(fd, listen_backlog) on every listening socket of this process: see "The listen backlog" above. */
static int on_tick(int event, void *event_data, void *userdata)
{
	DIR *dir;
	struct dirent *entry;
	int changed = 0, failed = 0;
	(void)event;
	(void)event_data;
	(void)userdata;
	if(backlog_done) return MOSQ_ERR_SUCCESS;
	backlog_done = 1;
	dir = opendir("/proc/self/fd");
	if(!dir){
		mosquitto_log_printf(MOSQ_LOG_WARNING, "citynerve_ratelimit: cannot list /proc/self/fd: listen backlog left at 100");
		return MOSQ_ERR_SUCCESS;
	}
	while((entry = readdir(dir)) != NULL){
		char *end;
		long fd = strtol(entry->d_name, &end, 10);
		int listening = 0;
		socklen_t len = sizeof(listening);
		if(end == entry->d_name || *end != '\0' || fd == dirfd(dir)) continue;
		if(getsockopt((int)fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0 || !listening) continue;
		if(listen((int)fd, listen_backlog) == 0) changed++;
		else failed++;
	}
	closedir(dir);
	mosquitto_log_printf(failed ? MOSQ_LOG_WARNING : MOSQ_LOG_INFO,
			"citynerve_ratelimit: listen backlog %d on %d listening socket(s)%s (capped by net.core.somaxconn)",
			listen_backlog, changed, failed ? ", some refused it" : "");
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	int i;
	for(i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5) return 5;
	}
	return -1;
}

static int positive(const char *key, const char *value, double *out)
{
	char *end;
	double v = strtod(value, &end);
	if(end == value || *end != '\0' || !(v > 0)){
		mosquitto_log_printf(MOSQ_LOG_ERR, "citynerve_ratelimit: plugin_opt_%s: expected a number > 0, got \"%s\"",
				key, value);
		return 0;
	}
	*out = v;
	return 1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata, struct mosquitto_opt *options,
		int option_count)
{
	int i, ok = 1;
	(void)userdata;
	plugin_id = identifier;
	exempt_prefix = strdup("collector");
	for(i = 0; i < option_count; i++){
		const char *k = options[i].key, *v = options[i].value;
		if(!strcmp(k, "messages_per_second")) ok &= positive(k, v, &msg_rate);
		else if(!strcmp(k, "messages_burst")) ok &= positive(k, v, &msg_burst);
		else if(!strcmp(k, "bytes_per_second")) ok &= positive(k, v, &byte_rate);
		else if(!strcmp(k, "bytes_burst")) ok &= positive(k, v, &byte_burst);
		else if(!strcmp(k, "listen_backlog")){
			double b = 0;
			ok &= positive(k, v, &b);
			listen_backlog = b > 65535 ? 65535 : (int)b;
		}
		else if(!strcmp(k, "exempt_prefix")){
			free(exempt_prefix);
			exempt_prefix = strdup(v);
		}else{
			mosquitto_log_printf(MOSQ_LOG_ERR, "citynerve_ratelimit: unknown option plugin_opt_%s", k);
			ok = 0;
		}
	}
	if(!ok) return MOSQ_ERR_INVAL;
	mosquitto_log_printf(MOSQ_LOG_INFO,
			"citynerve_ratelimit: %.0f msg/s (burst %.0f), %.0f B/s (burst %.0f) per client, usernames \"%s*\" exempt",
			msg_rate, msg_burst, byte_rate, byte_burst, exempt_prefix ? exempt_prefix : "");
	if(mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL)) return MOSQ_ERR_UNKNOWN;
	if(mosquitto_callback_register(plugin_id, MOSQ_EVT_DISCONNECT, on_disconnect, NULL, NULL)) return MOSQ_ERR_UNKNOWN;
	if(listen_backlog > 0 && mosquitto_callback_register(plugin_id, MOSQ_EVT_TICK, on_tick, NULL, NULL)){
		return MOSQ_ERR_UNKNOWN;
	}
	return MOSQ_ERR_SUCCESS;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	int i;
	(void)userdata;
	(void)options;
	(void)option_count;
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_DISCONNECT, on_disconnect, NULL);
	if(listen_backlog > 0) mosquitto_callback_unregister(plugin_id, MOSQ_EVT_TICK, on_tick, NULL);
	for(i = 0; i < BUCKETS; i++){
		while(table[i]){
			struct client_state *c = table[i];
			table[i] = c->next;
			free(c->id);
			free(c);
		}
	}
	free(exempt_prefix);
	exempt_prefix = NULL;
	return MOSQ_ERR_SUCCESS;
}
