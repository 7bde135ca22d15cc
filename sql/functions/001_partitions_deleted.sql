-- queen.messages has no foreign key to its partition: one checked every inserted row, ~12 % of
-- a push. The push locks its partition rows until commit (002_push.sql), so no partition can
-- vanish under a message being inserted, and deleting partitions deletes their messages here,
-- as an ON DELETE CASCADE would (queue deletes reach it through partitions' own cascade).

CREATE OR REPLACE FUNCTION queen.on_partitions_deleted() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM queen.messages m USING deleted_partitions d WHERE m.partition_id = d.id;
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER partitions_deleted_messages
    AFTER DELETE ON queen.partitions
    REFERENCING OLD TABLE AS deleted_partitions
    FOR EACH STATEMENT EXECUTE FUNCTION queen.on_partitions_deleted();
