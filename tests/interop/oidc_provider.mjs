// panva's oidc-provider (npm), configured strictly, for the interop tests (tests/test_interop.py).
//
// Everything comes from the environment: PORT, CLIENT_ID, CLIENT_SECRET, REDIRECT_URIS (space-separated)
// and ACCESS_TTL (seconds); with BACKCHANNEL_LOGOUT_URI, the client is registered for back-channel logout
// (with sid in its ID and logout tokens), and signing out at the provider POSTs a logout token there. Its own login and consent pages (devInteractions) accept any login and password.
// GET /_test/stats answers counters from the provider's events, so a test can tell how many refreshes
// the provider served and whether it ever revoked a grant.

import Provider from 'oidc-provider';

const env = process.env;
const port = Number(env.PORT);
const issuer = `http://127.0.0.1:${port}`;

const stats = { refresh: 0, narrowed_refresh: 0, authorization_code: 0, grant_revoked: 0, grant_errors: {}, revocations: 0 };

const configuration = {
  clients: [
    {
      client_id: env.CLIENT_ID,
      client_secret: env.CLIENT_SECRET,
      redirect_uris: env.REDIRECT_URIS.split(' '),
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
      ...(env.BACKCHANNEL_LOGOUT_URI
        ? { backchannel_logout_uri: env.BACKCHANNEL_LOGOUT_URI, backchannel_logout_session_required: true }
        : {}),
    },
  ],
  scopes: ['openid', 'offline_access', 'profile', 'email', 'viewables:read'],
  claims: { openid: ['sub'], profile: ['name'], email: ['email'] },
  async findAccount(_ctx, id) {
    return { accountId: id, claims: async () => ({ sub: id, name: id, email: `${id}@example.test` }) };
  },
  // Strict: PKCE for every client, a new refresh token at every refresh (no reuse grace exists in
  // oidc-provider: a consumed refresh token presented again revokes the whole grant).
  pkce: { required: () => true },
  rotateRefreshToken: true,
  ttl: {
    AccessToken: Number(env.ACCESS_TTL || 5),
    AuthorizationCode: 300,
    IdToken: 3600,
    Interaction: 600,
    Grant: 15 * 24 * 3600,
    RefreshToken: 15 * 24 * 3600,
    Session: 15 * 24 * 3600,
  },
  features: {
    devInteractions: { enabled: true },
    revocation: { enabled: true },
    introspection: { enabled: true },
    backchannelLogout: { enabled: Boolean(env.BACKCHANNEL_LOGOUT_URI) },
  },
  cookies: { keys: ['interop-test-cookie-key'] },
  // oidc-provider's SSRF guard refuses to call loopback addresses, where the app under test listens: this
  // test provider calls its one back-channel logout URI anyway (without the guard's dispatcher).
  ...(env.BACKCHANNEL_LOGOUT_URI
    ? { fetch: (url, { dispatcher: _guard, ...options }) => globalThis.fetch(url, options) }
    : {}),
};

const provider = new Provider(issuer, configuration);

provider.on('grant.success', (ctx) => {
  const { grant_type: grantType, scope } = ctx.oidc.params;
  if (grantType === 'refresh_token') {
    stats.refresh += 1;
    if (scope) stats.narrowed_refresh += 1;
  } else if (grantType === 'authorization_code') {
    stats.authorization_code += 1;
  }
});
provider.on('grant.error', (_ctx, error) => {
  const key = `${error.error}: ${error.error_description}`;
  stats.grant_errors[key] = (stats.grant_errors[key] || 0) + 1;
});
provider.on('grant.revoked', () => {
  stats.grant_revoked += 1;
});
provider.on('revocation.success', () => {
  stats.revocations += 1;
});
provider.on('backchannel.success', () => {
  stats.backchannel_logouts = (stats.backchannel_logouts || 0) + 1;
});
provider.on('backchannel.error', (_ctx, error) => {
  stats.backchannel_errors = (stats.backchannel_errors || 0) + 1;
  console.log(`back-channel logout failed: ${error.message}`);
});

provider.use(async (ctx, next) => {
  if (ctx.path === '/_test/stats') {
    ctx.body = stats;
    return;
  }
  await next();
});

provider.listen(port, '127.0.0.1', () => {
  console.log(`oidc-provider listening on ${issuer}`);
});
