// API keys for the front door (`vgate serve --api-key`), checked by nginx's njs module.
// The keys come from the environment (VGATE_API_KEYS, comma-separated), never from a file.
// Each key is compared in full whatever the given one is: time does not tell how much of
// a guess was right.
const KEYS = (process.env.VGATE_API_KEYS || '').split(',').filter((k) => k.length > 0);

function same(given, key) {
    let diff = given.length ^ key.length;
    for (let i = 0; i < key.length; i++) {
        diff |= key.charCodeAt(i) ^ (i < given.length ? given.charCodeAt(i) : 0);
    }
    return diff === 0;
}

function authorized(r) {
    const header = r.headersIn.Authorization || '';
    const given = header.startsWith('Bearer ') ? header.slice(7) : '';
    let ok = false;
    for (let i = 0; i < KEYS.length; i++) {
        ok = same(given, KEYS[i]) || ok;
    }
    return ok ? '1' : '0';
}

export default { authorized };
