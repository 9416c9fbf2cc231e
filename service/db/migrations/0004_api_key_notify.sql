-- API processes keep verified keys in memory; any change to a key (revocation, a new rate
-- limit, deletion) tells them at once, on commit, through channel `api_keys` (payload: key id).
CREATE FUNCTION notify_api_key_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify('api_keys', '*');
    ELSE
        PERFORM pg_notify('api_keys', OLD.id);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER api_key_changed AFTER UPDATE OR DELETE ON api_key
    FOR EACH ROW EXECUTE FUNCTION notify_api_key_changed();
CREATE TRIGGER api_key_truncated AFTER TRUNCATE ON api_key
    FOR EACH STATEMENT EXECUTE FUNCTION notify_api_key_changed();
